//! Generate the benchmark/test tree: `gentree DIR MIB [SEED]`.
#[path = "../../tests/it/common/tree.rs"]
#[allow(dead_code)]
mod tree;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: gentree DIR MIB [SEED]");
        std::process::exit(2);
    }
    let mb: usize = args[2].parse().expect("MIB is a number");
    let seed: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(7);
    tree::generate(std::path::Path::new(&args[1]), mb, seed);
}
