//! Support for the end-to-end tests in `tests/tests/`: the test-only stage plugins of the
//! runner tests ([`fixture`]) and the `msmae` binary the pipeline tests run.

pub mod fixture;

use std::path::PathBuf;

/// The `msmae` binary of this build: beside the test executable's `deps/` folder in the
/// shared target dir (built by `cargo xtask test`, which builds the whole workspace).
///
/// # Panics
/// When the binary is missing, with the command that builds it.
pub fn msmae_bin() -> PathBuf {
    built("msmae")
}

/// An example program of this build (`examples/NAME` in the same profile folder; `cargo
/// test` builds every example of the workspace).
///
/// # Panics
/// As [`msmae_bin`].
pub fn example_bin(name: &str) -> PathBuf {
    built(&format!("examples/{name}"))
}

fn built(rel: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("locating the test executable: {e}"));
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap_or_else(|| panic!("{} has no target profile folder above it", exe.display()));
    let bin = profile_dir.join(format!("{rel}{}", std::env::consts::EXE_SUFFIX));
    assert!(bin.is_file(), "{} not found: run the suite with `cargo xtask test` (it builds the msmae binary and the examples with the tests)", bin.display());
    bin
}
