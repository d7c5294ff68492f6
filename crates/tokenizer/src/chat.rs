//! Chat templates: the GGUF's own Jinja template (`tokenizer.chat_template`) rendered with
//! minijinja, or a built-in one per architecture when the file has none (the default Gemma 3
//! base model carries none).

use serde::Serialize;
use tpserve_gguf::Gguf;

use crate::Tokenizer;

/// One chat message, as the template sees it (`message['role']`, `message['content']`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Message {
    /// "system", "user" or "assistant" (OpenAI's roles); the built-in Gemma template writes
    /// "assistant" as Gemma's "model", and a file's own template may accept others.
    pub role: String,
    /// The message text, inserted as is (the built-in templates trim surrounding whitespace).
    pub content: String,
}

/// Why a chat prompt could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The template does not compile, or refused the conversation while rendering (the
    /// built-in Gemma template raises when roles do not alternate user/assistant). The text
    /// is minijinja's message or the template's own, fit to show the API client.
    #[error("chat template error: {0}")]
    Template(String),
}

/// Gemma's turn format; a system message is folded into the first user turn as Gemma's
/// own template does.
const GEMMA_TEMPLATE: &str = "{{ bos_token }}\
{%- if messages[0]['role'] == 'system' -%}\
{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\
{%- set loop_messages = messages[1:] -%}\
{%- else -%}\
{%- set first_user_prefix = '' -%}\
{%- set loop_messages = messages -%}\
{%- endif -%}\
{%- for message in loop_messages -%}\
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\
{%- endif -%}\
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}\
{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}";

/// Llama 3's header format.
const LLAMA3_TEMPLATE: &str = "{{ bos_token }}\
{%- for message in messages -%}\
{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}";

/// Llama 2's [INST] format.
const LLAMA2_TEMPLATE: &str = "\
{%- for message in messages -%}\
{%- if message['role'] == 'system' -%}{{ '<<SYS>>\n' + message['content'] | trim + '\n<</SYS>>\n\n' }}\
{%- elif message['role'] == 'user' -%}{{ bos_token + '[INST] ' + message['content'] | trim + ' [/INST]' }}\
{%- else -%}{{ ' ' + message['content'] | trim + ' ' + eos_token }}\
{%- endif -%}\
{%- endfor -%}";

/// Marks the start of a message's content while rendering (a private-use character).
const OPEN: char = '\u{E000}';
/// Marks the end of a message's content while rendering.
const CLOSE: char = '\u{E001}';

/// A model's chat template, compiled once, with the BOS and EOS texts it writes.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("bos", &self.bos).field("eos", &self.eos).finish_non_exhaustive()
    }
}

/// The template's source: the file's own, else the built-in one for the architecture
/// (`general.architecture`); Llama files with Llama 3's header tokens get Llama 3's format.
pub fn template_source<'a>(file_template: Option<&'a str>, arch: &str, has_llama3_tokens: bool) -> &'a str {
    match (file_template, arch) {
        (Some(t), _) => t,
        (None, "gemma3") => GEMMA_TEMPLATE,
        (None, _) if has_llama3_tokens => LLAMA3_TEMPLATE,
        (None, _) => LLAMA2_TEMPLATE,
    }
}

impl ChatTemplate {
    /// Compiles `source`; `bos` and `eos` are what `bos_token` and `eos_token` render as.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self, ChatError> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_owned()).map_err(|e| ChatError::Template(e.to_string()))?;
        Ok(Self { env, bos: bos.to_owned(), eos: eos.to_owned() })
    }

    /// The template of the model in `g` (its own, or the built-in one for its architecture),
    /// with `tok`'s BOS and EOS pieces.
    pub fn for_model(g: &Gguf, tok: &Tokenizer) -> Result<Self, ChatError> {
        let file = g.get("tokenizer.chat_template").and_then(|v| v.as_str());
        let arch = g.get("general.architecture").and_then(|v| v.as_str()).unwrap_or("");
        let source = template_source(file, arch, tok.token_id("<|start_header_id|>").is_some());
        let piece = |id: Option<u32>| id.and_then(|i| tok.token_str(i)).unwrap_or("");
        Self::new(source, piece(tok.bos_id()), piece(tok.eos_id()))
    }

    /// Renders `messages` into the prompt text (special tokens spelled out, BOS included when
    /// the template writes it). For the model, use [`ChatTemplate::encode`], which does not
    /// read special tokens in the messages' contents.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, ChatError> {
        self.render_with(messages, add_generation_prompt)
    }

    fn render_with(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, ChatError> {
        let tmpl = self.env.get_template("chat").map_err(|e| ChatError::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            bos_token => self.bos,
            eos_token => self.eos,
            add_generation_prompt => add_generation_prompt,
        })
        .map_err(|e| ChatError::Template(e.to_string()))
    }

    /// Renders `messages` and returns the text with the byte ranges that came from the
    /// messages' contents (sorted, disjoint). Each content is rendered between two private-use
    /// marker characters placed inside its surrounding whitespace, so a template's `trim`
    /// acts as on the content alone; the markers are then taken out, and marker characters a
    /// client wrote in a message are dropped from it.
    pub fn render_spans(&self, messages: &[Message], add_generation_prompt: bool) -> Result<(String, Vec<std::ops::Range<usize>>), ChatError> {
        let marked: Vec<Message> = messages
            .iter()
            .map(|m| {
                let c: String = m.content.chars().filter(|&ch| ch != OPEN && ch != CLOSE).collect();
                let core = c.trim();
                let content = if core.is_empty() {
                    c.clone()
                } else {
                    let lead = &c[..c.len() - c.trim_start().len()];
                    let trail = &c[c.trim_end().len()..];
                    format!("{lead}{OPEN}{core}{CLOSE}{trail}")
                };
                Message { role: m.role.clone(), content }
            })
            .collect();
        let rendered = self.render_with(&marked, add_generation_prompt)?;
        let mut text = String::with_capacity(rendered.len());
        let mut spans = Vec::new();
        let mut open: Option<usize> = None;
        for ch in rendered.chars() {
            match ch {
                OPEN => open = open.or(Some(text.len())),
                CLOSE => {
                    if let Some(start) = open.take() {
                        if start < text.len() {
                            spans.push(start..text.len());
                        }
                    }
                }
                _ => text.push(ch),
            }
        }
        // A content the template cut short of its end marker is plain to the end.
        if let Some(start) = open.filter(|&s| s < text.len()) {
            spans.push(start..text.len());
        }
        Ok((text, spans))
    }

    /// The prompt token ids of `messages`: the rendered template tokenized with `tok`, the
    /// template's own special tokens (`<start_of_turn>`, BOS) as their ids and the
    /// messages' contents as plain text, so a client cannot forge turn boundaries by writing
    /// `<end_of_turn>` in a message (as hosted APIs do). BOS comes from the template.
    pub fn encode(&self, tok: &Tokenizer, messages: &[Message], add_generation_prompt: bool) -> Result<Vec<u32>, ChatError> {
        let (text, spans) = self.render_spans(messages, add_generation_prompt)?;
        Ok(tok.encode_with_plain(&text, false, &spans))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }

    fn template(file: Option<&str>, arch: &str, llama3: bool, bos: &str) -> ChatTemplate {
        ChatTemplate::new(template_source(file, arch, llama3), bos, "<eos>").unwrap()
    }

    #[test]
    fn gemma_template_folds_the_system_prompt_into_the_first_turn() {
        let t = template(None, "gemma3", false, "<bos>");
        let s = t.render(&[msg("system", "Be brief."), msg("user", "Hi!"), msg("assistant", "Hello."), msg("user", "Bye")], true).unwrap();
        assert_eq!(
            s,
            "<bos><start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn roles_that_do_not_alternate_are_an_error() {
        let t = template(None, "gemma3", false, "<bos>");
        let e = t.render(&[msg("user", "a"), msg("user", "b")], true).unwrap_err();
        assert!(e.to_string().contains("alternate"), "{e}");
    }

    #[test]
    fn a_files_own_template_is_used_when_present() {
        let t = template(Some("{% for m in messages %}[{{ m.role }}:{{ m.content.strip() }}]{% endfor %}"), "llama", false, "");
        assert_eq!(t.render(&[msg("user", " x ")], false).unwrap(), "[user:x]");
    }

    #[test]
    fn llama3_template_writes_headers() {
        let t = template(None, "llama", true, "<|begin_of_text|>");
        let s = t.render(&[msg("user", "hi")], true).unwrap();
        assert_eq!(s, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
    }
}
