//! `tpserve tokenize`: the ids the model would see for a text.

use std::io::{Read, Write};

use anyhow::{Context, Result};
use clap::Args;

use super::Loaded;
use crate::ModelArgs;

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// The text to tokenize; `-` reads standard input.
    pub text: String,
    /// Do not prepend the BOS token.
    #[arg(long)]
    pub no_bos: bool,
    /// Print `{"ids": [...]}` instead of space-separated ids.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn run(args: TokenizeArgs) -> Result<()> {
    let text = if args.text == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("cannot read the text from standard input (is it UTF-8?)")?;
        s
    } else {
        args.text
    };
    let loaded = Loaded::open(&args.model)?;
    let ids = loaded.tokenizer.encode(&text, !args.no_bos, true);
    let line = if args.json { serde_json::json!({ "ids": ids }).to_string() } else { ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(" ") };
    writeln!(std::io::stdout().lock(), "{line}").context("cannot write the ids to standard output")?;
    Ok(())
}
