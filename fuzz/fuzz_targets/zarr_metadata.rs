#![no_main]
//! Fuzz target: see `nemo_tool::testkit::hostile::zarr_metadata`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| nemo_tool::testkit::hostile::zarr_metadata(data));
