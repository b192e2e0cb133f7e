//! The commands' library side, one module each: `inspect`, `reshard`,
//! `convert`, `validate`, `checksum`, `diff` (`pack` is
//! [`crate::model::checkpoint::write`]). Each takes options and returns a
//! report; printing is the CLI's.

pub mod checksum;
pub mod convert;
pub mod data_make;
pub mod diff;
pub mod inspect;
pub mod reshard;
pub mod validate;
