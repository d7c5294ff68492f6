//! Fuzzes the HTTP request bodies: the bytes are read as a `POST /v1/completions` and as a
//! `POST /v1/chat/completions` body and go through every check before the engine (JSON, the
//! refused parameters, each field's type, the prompt or messages, the request builder).
//! Each must answer a request or a 4xx `ApiError` with a message, never panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tpserve_coordinator::Limits;
use tpserve_server::openai::check_body;

const LIMITS: Limits = Limits { context_len: 4096, kv_tokens: 4096, vocab: 1000 };

fuzz_target!(|data: &[u8]| {
    for chat in [false, true] {
        if let Err(e) = check_body(data, chat, LIMITS) {
            assert!(e.status.is_client_error(), "{}: {}", e.status, e.message);
            assert!(!e.message.is_empty());
        }
    }
});
