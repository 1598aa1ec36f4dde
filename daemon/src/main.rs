// glibc's per-thread arenas fault in and trim memory for every 1 MiB chunk buffer; with them a
// 2 GiB restore spent more time in the kernel than in crypto (bench/volume.sh: 6.2 s, 305 MiB
// RSS with glibc; mimalloc reuses freed buffers).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_arena_eager_commit` (v3 `mimalloc.h`, which libmimalloc-sys builds;
/// its Rust bindings omit the constant). `MIMALLOC_VERBOSE=1 veza-dr --version` shows it as 0.
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
/// `mi_option_allow_thp`, likewise.
const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// mimalloc commits each 1 GiB arena up front on Linux and asks for transparent huge pages, so
/// touched memory counts in 2 MiB pages: a 2 GiB volume backup peaked at 266-304 MiB RSS with
/// it, 198-254 MiB without, in the same time (bench/volume.sh's first backup, alternated). A
/// wal-push, which PostgreSQL waits for and which faults in a fresh 16 MiB segment buffer, is
/// faster with eager commit (median of 16 pushes: 55-59 ms eager, 68-69 ms on demand), so the WAL
/// commands keep it. Since wal-push maps the segment rather than reading it into a buffer,
/// transparent huge pages cost it more than they save: each fresh 2 MiB page is zeroed whole
/// for the few megabytes a push allocates (9 pushes: 338-357 ms of CPU without them, 368-419
/// ms with), so wal-push goes without. wal-fetch, which decompresses a whole segment into a
/// fresh buffer, keeps them (median of 9 fetches, four rounds alternated: 29-36 ms with them,
/// 35-45 ms without). The first arena is reserved before `main` runs, so the options
/// are set from a constructor that the linker orders before the default ones (mimalloc's own
/// among them); glibc hands such constructors the command line. Any argument spelled
/// `wal-push` or `wal-fetch` counts (a policy of that name too): the choice only changes speed
/// and memory.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[used]
#[unsafe(link_section = ".init_array.00100")]
static ARENA_COMMIT_ON_DEMAND: extern "C" fn(
    std::ffi::c_int,
    *const *const std::ffi::c_char,
    *const *const std::ffi::c_char,
) = arena_commit_on_demand;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
extern "C" fn arena_commit_on_demand(
    argc: std::ffi::c_int,
    argv: *const *const std::ffi::c_char,
    _env: *const *const std::ffi::c_char,
) {
    let spelled = |words: &[&[u8]]| {
        (1..argc.max(0) as usize).any(|i| {
            // SAFETY: glibc passes main's argc and argv to init_array functions: argc valid,
            // NUL-terminated strings.
            let arg = unsafe { std::ffi::CStr::from_ptr(*argv.add(i)) };
            words.contains(&arg.to_bytes())
        })
    };
    // Defaults, so MIMALLOC_ARENA_EAGER_COMMIT and MIMALLOC_ALLOW_THP still override them.
    // SAFETY: each sets one allocator option; runs before main, on the only thread.
    if !spelled(&[b"wal-push", b"wal-fetch"]) {
        unsafe { libmimalloc_sys::mi_option_set_default(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
    } else if spelled(&[b"wal-push"]) {
        unsafe { libmimalloc_sys::mi_option_set_default(MI_OPTION_ALLOW_THP, 0) };
    }
}

fn main() {
    std::process::exit(veza_dr::cli::main());
}
