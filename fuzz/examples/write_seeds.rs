//! Writes the seed corpora into `fuzz/seeds/` (run from anywhere):
//! `cargo run --manifest-path fuzz/Cargo.toml --example write_seeds`.

fn main() -> std::io::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let written = hush_fuzz::seeds::write_all(&dir)?;
    println!("{written} seeds written to {}", dir.display());
    Ok(())
}
