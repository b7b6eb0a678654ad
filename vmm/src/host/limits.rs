//! Process limits skiff sets for itself at start.

/// Raises the soft limit on open descriptors to the hard one (as QEMU's
/// `-run-with` and systemd's services do): a guest's open files on a 9p
/// share each take one, and the usual soft limit of 1,024 would otherwise
/// leave QMP, reconnects and reboots none. Returns the limit now in force.
pub fn raise_descriptor_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into `lim`, which outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads one rlimit from `raised`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
    }
    lim.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The soft limit ends at the hard one (in a child, so the test
    /// process's own limits stay).
    #[test]
    fn the_soft_descriptor_limit_reaches_the_hard_one() {
        // SAFETY: the child only calls async-signal-safe functions
        // (getrlimit/setrlimit/_exit) before exiting.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            // SAFETY: as above.
            unsafe {
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
                let lowered =
                    libc::rlimit { rlim_cur: 64.min(lim.rlim_max), rlim_max: lim.rlim_max };
                libc::setrlimit(libc::RLIMIT_NOFILE, &lowered);
            }
            let now = raise_descriptor_limit();
            // SAFETY: as above.
            unsafe {
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
                libc::_exit(i32::from(!(now == lim.rlim_max && lim.rlim_cur == lim.rlim_max)));
            }
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "status {status}");
    }
}
