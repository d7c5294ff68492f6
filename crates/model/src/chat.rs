//! Chat templates: the GGUF's own Jinja template (`tokenizer.chat_template`) rendered with
//! minijinja, or a built-in one per architecture when the file has none (the default Gemma 3
//! base model carries none).

use serde::Serialize;

use crate::config::Arch;

/// One chat message.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
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

/// Picks the template: the file's own, else the built-in one for the architecture.
pub fn template_for(file_template: Option<&str>, arch: Arch, has_llama3_tokens: bool) -> String {
    match (file_template, arch) {
        (Some(t), _) => t.to_owned(),
        (None, Arch::Gemma3) => GEMMA_TEMPLATE.to_owned(),
        (None, Arch::Llama) if has_llama3_tokens => LLAMA3_TEMPLATE.to_owned(),
        (None, Arch::Llama) => LLAMA2_TEMPLATE.to_owned(),
    }
}

/// Renders `messages` into the prompt text (special tokens spelled out, BOS included when
/// the template writes it, so tokenize it with `add_bos = false, parse_special = true`).
pub fn render(template: &str, messages: &[Message], bos: &str, eos: &str, add_generation_prompt: bool) -> Result<String, ChatError> {
    let mut env = minijinja::Environment::new();
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env.add_template("chat", template).map_err(|e| ChatError::Template(e.to_string()))?;
    let tmpl = env.get_template("chat").map_err(|e| ChatError::Template(e.to_string()))?;
    tmpl.render(minijinja::context! {
        messages => messages,
        bos_token => bos,
        eos_token => eos,
        add_generation_prompt => add_generation_prompt,
    })
    .map_err(|e| ChatError::Template(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }

    #[test]
    fn gemma_template_folds_the_system_prompt_into_the_first_turn() {
        let t = template_for(None, Arch::Gemma3, false);
        let s = render(&t, &[msg("system", "Be brief."), msg("user", "Hi!"), msg("assistant", "Hello."), msg("user", "Bye")], "<bos>", "<eos>", true).unwrap();
        assert_eq!(
            s,
            "<bos><start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn roles_that_do_not_alternate_are_an_error() {
        let t = template_for(None, Arch::Gemma3, false);
        let e = render(&t, &[msg("user", "a"), msg("user", "b")], "<bos>", "<eos>", true).unwrap_err();
        assert!(e.to_string().contains("alternate"), "{e}");
    }

    #[test]
    fn a_files_own_template_is_used_when_present() {
        let t = template_for(Some("{% for m in messages %}[{{ m.role }}:{{ m.content.strip() }}]{% endfor %}"), Arch::Llama, false);
        assert_eq!(render(&t, &[msg("user", " x ")], "", "", false).unwrap(), "[user:x]");
    }

    #[test]
    fn llama3_template_writes_headers() {
        let t = template_for(None, Arch::Llama, true);
        let s = render(&t, &[msg("user", "hi")], "<|begin_of_text|>", "", true).unwrap();
        assert_eq!(s, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
    }
}
