#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| luo_cuse_dev::fuzzing::journal(data));
