//! Says, on a plain `cargo test`, that the guest tests were left out and how
//! to run them, instead of downloading kernels behind the user's back.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_GUEST").is_none() {
        println!(
            "cargo:warning=guest tests not built (they boot real kernels): run \
             resources/test.sh, or cargo test --release -p skiff-tests --features guest \
             after cargo build --release -p vmm"
        );
    }
}
