//! Fuzzes what a stranger can send to a worker's collective port: the bytes are read as the
//! first hello of a connection, as rank 0 of a world of 4 would in session 7. Checking must
//! never panic or allocate by the input, and must accept only a hello made with the key for
//! this session and pair (which random bytes never are).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tpserve_comm::tcp::{check_hello, hello};

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

fuzz_target!(|data: &[u8]| {
    if let Some(from) = check_hello(data, KEY, 7, 0, 4) {
        // Only the real hello of rank `from` gets in.
        assert_eq!(data, &hello(KEY, 7, from, 0)[..]);
    }
});
