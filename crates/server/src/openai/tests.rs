//! The body checks: what each wrong body is told, and that no bytes make them panic.

use serde_json::json;
use tpserve_coordinator::Limits;

use super::*;

const LIMITS: Limits = Limits { context_len: 4096, kv_tokens: 4096, vocab: 1000 };

/// The error a completions body gets, as (param, message).
fn completion_error(body: &Value) -> (Option<String>, String) {
    let e = parse_completion(body.to_string().as_bytes())
        .and_then(|r| {
            let ids = match r.prompt(LIMITS.vocab)? {
                Prompt::Ids(ids) => ids,
                Prompt::Text(_) => vec![1, 2, 3],
            };
            Ok(r.common.params(Some(16))?.build(ids, LIMITS)?)
        })
        .expect_err("a bad body");
    assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{}", e.message);
    (e.param.map(|p| p.into_owned()), e.message)
}

fn error_is(body: Value, param: &str, message: &str) {
    let (p, m) = completion_error(&body);
    assert_eq!(p.as_deref(), Some(param), "{body}: {m}");
    assert!(m.contains(message), "{body}: {m:?} does not say {message:?}");
}

#[test]
fn wrong_types_name_the_parameter_and_say_what_it_must_be_in_json_terms() {
    error_is(json!({"prompt": "a", "max_tokens": "ten"}), "max_tokens", r#"max_tokens must be an integer, got "ten""#);
    error_is(json!({"prompt": "a", "max_tokens": 1.5}), "max_tokens", "max_tokens must be an integer, got 1.5");
    error_is(json!({"prompt": "a", "temperature": "hot"}), "temperature", r#"temperature must be a number, got "hot""#);
    error_is(json!({"prompt": "a", "stream": "yes"}), "stream", r#"stream must be true or false, got "yes""#);
    error_is(json!({"prompt": "a", "stream_options": 3}), "stream_options", "stream_options must be an object, got 3");
    error_is(json!({"prompt": "a", "stream_options": {"include_usage": 1}}), "stream_options.include_usage", "must be true or false, got 1");
    error_is(json!({"prompt": "a", "seed": 18446744073709551615u64}), "seed", "seed must be an integer from -9223372036854775808");
    error_is(json!({"prompt": "a", "stop": ["x", 5]}), "stop[1]", "stop[1] must be a string, got 5");
    error_is(json!({"prompt": "a", "logit_bias": [1]}), "logit_bias", "logit_bias must be an object");
    error_is(json!({"max_tokens": 3}), "prompt", "prompt is required");
    let (p, m) = completion_error(&json!({"prompt": "a", "max_tokens": "ten"}));
    assert!(!m.contains("i64") && p.is_some(), "no Rust type names: {m}");
}

#[test]
fn prompt_token_ids_out_of_range_name_the_element_and_the_range() {
    error_is(json!({"prompt": [-1]}), "prompt[0]", "prompt[0] is -1: token ids are integers from 0 to 999");
    error_is(json!({"prompt": [5, 1000]}), "prompt[1]", "prompt[1] is 1000: token ids are integers from 0 to 999");
    error_is(json!({"prompt": [[5, 2.5]]}), "prompt[0][1]", "prompt[0][1] is 2.5");
    error_is(json!({"prompt": [5, "a"]}), "prompt[1]", r#"prompt[1] is "a""#);
    error_is(json!({"prompt": []}), "prompt", "prompt is empty");
    error_is(json!({"prompt": 7}), "prompt", "prompt must be a string, an array of one string, or an array of token ids, got 7");
    error_is(json!({"prompt": ["a", "b"]}), "prompt", "only one prompt per request");
    let r = parse_completion(br#"{"prompt": [[3, 4]]}"#).unwrap();
    assert_eq!(r.prompt(LIMITS.vocab).unwrap(), Prompt::Ids(vec![3, 4]));
}

#[test]
fn parameters_we_do_not_implement_are_refused_naming_them_and_neutral_values_pass() {
    for (field, value) in [
        ("best_of", json!(2)),
        ("suffix", json!("end")),
        ("tools", json!([{"type": "function", "function": {"name": "f"}}])),
        ("tool_choice", json!("auto")),
        ("functions", json!([{"name": "f"}])),
        ("function_call", json!("auto")),
        ("response_format", json!({"type": "json_object"})),
        ("parallel_tool_calls", json!(true)),
        ("store", json!(true)),
        ("audio", json!({"voice": "alloy"})),
        ("modalities", json!(["text", "audio"])),
        ("reasoning_effort", json!("low")),
        ("min_p", json!(0.1)),
        ("repetition_penalty", json!(1.2)),
        ("guided_json", json!({})),
    ] {
        let mut body = json!({"prompt": "a"});
        body[field] = value;
        let (p, m) = completion_error(&body);
        assert_eq!(p.as_deref(), Some(field), "{body}: {m}");
        assert!(m.contains(field) && m.contains("not supported"), "{m}");
    }
    let neutral = json!({"prompt": "a", "best_of": 1, "suffix": "", "tool_choice": "none", "response_format": {"type": "text"},
        "parallel_tool_calls": false, "store": false, "modalities": ["text"], "user": "u", "metadata": {"a": "b"}, "tools": null,
        "service_tier": "auto", "min_p": 0, "repetition_penalty": 1.0, "some_other_servers_extension": 3});
    let r = parse_completion(neutral.to_string().as_bytes()).unwrap();
    r.common.params(None).unwrap();
    let e = parse_chat(json!({"messages": [], "n": 2}).to_string().as_bytes()).unwrap().common.params(None).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("n"));
}

#[test]
fn logit_bias_is_checked_for_ids_and_range_and_reaches_the_request() {
    let r = parse_completion(br#"{"prompt": "a", "logit_bias": {"7": 100, "3": -100, "9": 2.5}}"#).unwrap();
    let req = r.common.params(None).unwrap().build(vec![1], LIMITS).unwrap();
    assert_eq!(req.logit_bias.entries(), &[(3, -100.0), (7, 100.0), (9, 2.5)]);
    error_is(json!({"prompt": "a", "logit_bias": {"1000": 1}}), "logit_bias", "token ids are integers from 0 to 999");
    error_is(json!({"prompt": "a", "logit_bias": {"-2": 1}}), "logit_bias", "token ids are integers from 0 to 999");
    error_is(json!({"prompt": "a", "logit_bias": {"5": 100.5}}), "logit_bias", "from -100 to 100");
    error_is(json!({"prompt": "a", "logit_bias": {"5": "x"}}), "logit_bias", r#"logit_bias["5"] must be a number from -100 to 100, got "x""#);
    error_is(json!({"prompt": "a", "logit_bias": {"word": 1}}), "logit_bias", r#"logit_bias key "word" is not a token id"#);
}

#[test]
fn chat_messages_errors_name_the_message_and_its_field() {
    let e = parse_chat(br#"{"messages": [{"role": "user", "content": "a"}, {"role": 3}]}"#).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("messages[1].role"));
    assert!(e.message.contains("messages[1].role must be a string, got 3"), "{}", e.message);
    let e = parse_chat(br#"{"messages": [{"content": "a"}]}"#).unwrap_err();
    assert_eq!((e.param.as_deref(), e.message.as_str()), (Some("messages[0].role"), "messages[0].role is required"));
    let r = parse_chat(br#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}, {"role": "user", "content": 5}]}"#).unwrap();
    let e = r.messages[0].text(0).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("messages[0].content[0]"), "{}", e.message);
    let e = r.messages[1].text(1).unwrap_err();
    assert!(e.message.contains("messages[1].content must be a string or an array of text parts, got 5"), "{}", e.message);
    let e = parse_chat(b"[1, 2]").unwrap_err();
    assert!(e.message.contains("must be a JSON object, got [1,2]"), "{}", e.message);
    let e = parse_chat(b"{\"messages\": [").unwrap_err();
    assert!(e.message.starts_with("the body is not valid JSON"), "{}", e.message);
}

/// A small xorshift generator: the same seed gives the same inputs on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn any_bytes_get_an_answer_and_never_a_panic() {
    let seeds: Vec<String> = [
        json!({"prompt": "hello", "max_tokens": 5, "temperature": 0.5, "stop": ["a"], "logit_bias": {"5": 10}}),
        json!({"prompt": [[1, 2, 3]], "logprobs": 2, "echo": true, "seed": -4, "top_k": 3, "stream": true, "stream_options": {"include_usage": true}}),
        json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_completion_tokens": 9, "top_logprobs": 2, "logprobs": true}),
        json!({"messages": [{"role": "system", "content": null}], "response_format": {"type": "text"}, "best_of": 1, "n": 1}),
    ]
    .iter()
    .map(Value::to_string)
    .collect();
    let tokens: [&[u8]; 12] = [b"{", b"}", b"[", b"]", b"\"", b":", b",", b"-1", b"1e999", b"null", b"\"prompt\"", b"\"logit_bias\""];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut ok, mut refused) = (0, 0);
    for i in 0..4000 {
        let mut body = seeds[i % seeds.len()].clone().into_bytes();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(body.len() + 1);
            match rng.below(4) {
                0 if !body.is_empty() => {
                    body.remove(at.min(body.len() - 1));
                }
                1 => body.insert(at, rng.next() as u8),
                2 => body.splice(at..at, tokens[rng.below(tokens.len())].iter().copied()).for_each(drop),
                _ => body.truncate(at),
            }
        }
        for r in [check_body(&body, false, LIMITS).map(drop), check_body(&body, true, LIMITS).map(drop)] {
            match r {
                Ok(()) => ok += 1,
                Err(e) => {
                    assert!(e.status.is_client_error(), "{:?}: {}", String::from_utf8_lossy(&body), e.message);
                    assert!(!e.message.is_empty());
                    refused += 1;
                }
            }
        }
    }
    // The mutations are small: some bodies stay valid, and many do not.
    assert!(ok > 100 && refused > 1000, "ok {ok}, refused {refused}");
}
