fn main() {
    std::process::exit(veza_dr::cli::main());
}
