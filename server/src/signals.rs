//! The process signals the relay binary handles: SIGTERM and Ctrl-C stop it gracefully;
//! SIGXFSZ is caught so that a file-size limit fails the write that crosses it.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// Resolves at SIGTERM or Ctrl-C.
pub async fn shutdown() -> std::io::Result<()> {
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result?,
        _ = terminate.recv() => {}
    }
    Ok(())
}

/// Catches SIGXFSZ for as long as the returned handle lives (and after: tokio never
/// uninstalls a handler). By default the signal kills a process whose write crosses its
/// file-size limit (RLIMIT_FSIZE); caught, the write fails with EFBIG instead, the commit
/// fails with a typed error and the relay carries on, as on a full disk.
pub fn survive_file_size_limit() -> std::io::Result<Signal> {
    signal(SignalKind::from_raw(libc::SIGXFSZ))
}
