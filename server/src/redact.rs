//! The log redaction layer (P9). The relay's own log lines never carry account ids, device
//! ids, tokens or content (identifiers are redacted in their `Debug` forms and never
//! logged). Dependencies are another matter: quinn logs peer addresses at `trace` and in
//! some `warn`ings. Every log line therefore passes through [`redact_addresses`] before it
//! is written, whatever the log level.

use std::io::{self, Write};

/// Replaces anything shaped like an IPv4 or IPv6 address (with an optional port) by
/// `<addr>`.
pub fn redact_addresses(line: &str) -> String {
    let bytes = line.as_bytes();
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while i < bytes.len() {
        let is_run = |b: u8| b.is_ascii_hexdigit() || b == b':' || b == b'.';
        if is_run(bytes[i]) && (i == 0 || !bytes[i - 1].is_ascii_alphanumeric()) {
            let start = i;
            let mut end = i;
            while end < bytes.len() && is_run(bytes[end]) {
                end += 1;
            }
            let run = &line[start..end];
            if looks_like_address(run) {
                out.push_str("<addr>");
            } else {
                out.push_str(run);
            }
            i = end;
        } else {
            let ch = line[i..].chars().next().unwrap_or(' ');
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

fn looks_like_address(run: &str) -> bool {
    let run = run.trim_end_matches(['.', ':']);
    // IPv6: a "::" or at least three colons (timestamps have two).
    if run.contains("::") || run.matches(':').count() >= 3 {
        return run.chars().any(|c| c.is_ascii_hexdigit());
    }
    // IPv4, optionally with a port: four dot-separated decimal numbers up to 255.
    let host = run.split(':').next().unwrap_or("");
    let parts: Vec<&str> = host.split('.').collect();
    parts.len() == 4
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.len() <= 3
                && p.bytes().all(|b| b.is_ascii_digit())
                && p.parse::<u16>().is_ok_and(|n| n <= 255)
        })
}

/// An [`io::Write`] that redacts each complete line before passing it on.
pub struct RedactingWriter<W: Write> {
    inner: W,
    pending: Vec<u8>,
}

impl<W: Write> RedactingWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        RedactingWriter {
            inner,
            pending: Vec::new(),
        }
    }

    fn flush_lines(&mut self, all: bool) -> io::Result<()> {
        while let Some(newline) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=newline).collect();
            self.inner
                .write_all(redact_addresses(&String::from_utf8_lossy(&line)).as_bytes())?;
        }
        if all && !self.pending.is_empty() {
            let rest = std::mem::take(&mut self.pending);
            self.inner
                .write_all(redact_addresses(&String::from_utf8_lossy(&rest)).as_bytes())?;
        }
        Ok(())
    }
}

impl<W: Write> Write for RedactingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        self.flush_lines(false)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_lines(true)?;
        self.inner.flush()
    }
}

impl<W: Write> Drop for RedactingWriter<W> {
    fn drop(&mut self) {
        let _ = self.flush_lines(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_redacted_and_timestamps_are_not() {
        let line = "2026-11-24T03:42:35.718530Z TRACE quinn: packet from 192.168.1.20:54321 and [::1]:443 and fe80::1%2 via 10.0.0.1 ok";
        let redacted = redact_addresses(line);
        assert_eq!(
            redacted,
            "2026-11-24T03:42:35.718530Z TRACE quinn: packet from <addr> and [<addr>]:443 and <addr>%2 via <addr> ok"
        );
        assert_eq!(
            redact_addresses("version 1.2.3 took 0.5 ms, code 15"),
            "version 1.2.3 took 0.5 ms, code 15"
        );
        assert_eq!(redact_addresses("2001:db8:0:0:0:0:2:1"), "<addr>");
    }

    #[test]
    fn the_writer_redacts_across_split_writes() {
        let mut out = Vec::new();
        {
            let mut writer = RedactingWriter::new(&mut out);
            writer.write_all(b"from 127.0.").unwrap();
            writer.write_all(b"0.1:9 done\nnext").unwrap();
        }
        assert_eq!(String::from_utf8(out).unwrap(), "from <addr> done\nnext");
    }
}
