//! Fuzz the stream decoder, page unpacking and epoch verifier with arbitrary bytes.
//! The same entry function runs on stable in `stream/tests/robustness.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    remus_stream::fuzzing::decode_all(data);
});
