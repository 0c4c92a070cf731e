//! `turnout inspect`: what a bundle says about itself, trusting nothing.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;

use anyhow::Context as _;
use turnout_proto::Limits;
use turnout_proto::bundle::read_head;

use crate::exit::Exit;
use crate::files::{InputError, human_bytes};

/// Arguments of `turnout inspect`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The bundle to show.
    pub bundle: PathBuf,
    /// Print JSON (the manifest as signed, and the signatures' key ids).
    #[arg(long)]
    pub json: bool,
}

/// Prints the manifest, files, links and signatures.
pub fn run(args: &Args) -> anyhow::Result<Exit> {
    let file = File::open(&args.bundle).map_err(|source| InputError::Read {
        path: args.bundle.clone(),
        cause: source,
    })?;
    let head = read_head(BufReader::new(file), &Limits::default())
        .with_context(|| format!("reading {}", args.bundle.display()))?;
    let m = &head.manifest;
    let key_ids: Vec<_> = head.signatures.iter().map(|s| s.key_id.as_str()).collect();
    if args.json {
        let manifest: serde_json::Value = serde_json::from_slice(&head.manifest_bytes)?;
        let out =
            serde_json::json!({"manifest": manifest, "signatures": key_ids, "verified": false});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(Exit::Success);
    }
    println!("{} {} (manifest format {})", m.name, m.version, m.format);
    println!("created    {}", m.created);
    if let Some(expires) = m.expires {
        println!("expires    {expires}");
    }
    println!("entry      {}", m.entry);
    if !m.provides.is_empty() {
        println!("provides   {}", m.provides.join(", "));
    }
    if !m.requires.is_empty() {
        println!("requires   {}", m.requires.join(", "));
    }
    for key in m.extra.keys() {
        println!("{key:<10} (a field this build does not know)");
    }
    println!(
        "files      {} ({})",
        m.files.len(),
        human_bytes(m.payload_bytes())
    );
    for file in &m.files {
        println!(
            "  {}  {:>12}  {}  {}",
            String::from(file.mode),
            file.size,
            file.sha256.short(),
            file.path
        );
    }
    if !m.links.is_empty() {
        println!("links      {}", m.links.len());
        for link in &m.links {
            println!("  {} -> {}", link.path, link.target);
        }
    }
    println!(
        "signatures {} (not verified: use `turnout verify --trust`)",
        key_ids.len()
    );
    for id in key_ids {
        println!("  {id}");
    }
    Ok(Exit::Success)
}
