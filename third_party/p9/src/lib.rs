// Copyright 2018 The ChromiumOS Authors
// Use of this source code is governed by a BSD-style license that can be
// found in the LICENSE file.

#![cfg(unix)]
// Vendored: upstream's style is kept so that its diff stays small (see
// README.skiff.md); these are lints of newer toolchains than upstream's.
#![allow(
    dead_code,
    mismatched_lifetime_syntaxes,
    clippy::manual_c_str_literals,
    clippy::needless_as_bytes,
    clippy::legacy_numeric_constants
)]

mod protocol;
mod server;

pub mod fuzzing;

pub use server::*;

#[macro_export]
macro_rules! syscall {
    ($e:expr) => {{
        let res = $e;
        if res < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(res)
        }
    }};
}
