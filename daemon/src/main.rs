// glibc's per-thread arenas fault in and trim memory for every 1 MiB chunk buffer; with them a
// 2 GiB restore spent more time in the kernel than in crypto (bench/volume.sh: 6.2 s, 305 MiB
// RSS with glibc; mimalloc reuses freed buffers).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(veza_dr::cli::main());
}
