//! Raw training text: corpus files (`corpus`) and the tokenizer that turns their documents into
//! token ids (`tokenizer`), for `data make` (`crate::ops::data_make`).

pub mod bytelevel;
pub mod corpus;
pub mod sentencepiece;
pub mod tokenizer;
