#![no_main]
//! Fuzz target: see `nemo_tool::testkit::hostile::config_reader`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| nemo_tool::testkit::hostile::config_reader(data));
