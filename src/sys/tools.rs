//! The external programs thinfs runs, in one place: which program, which
//! Debian package has it, and how a missing one is reported. Nothing else
//! in thinfs spawns a file-system tool by name.

use crate::error::{Error, IoContext, Result};
use std::ffi::OsStr;
use std::io;
use std::path::PathBuf;
use std::process::{Command, Output};

/// An external program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// Makes the ext4 of a new image.
    MkfsExt4,
    /// Checks and repairs an image's ext4.
    E2fsck,
    /// Grows an image's ext4 offline.
    Resize2fs,
    /// Makes the XFS of a new reflink pool file.
    MkfsXfs,
    /// Loads the dm-thin module.
    Modprobe,
    /// Lists the changed ranges of two dm-thin devices from the pool's
    /// metadata.
    ThinDelta,
}

impl Tool {
    /// What the daemon needs for every pool.
    pub const REQUIRED: [Tool; 2] = [Tool::MkfsExt4, Tool::E2fsck];

    /// The program's name.
    pub fn program(self) -> &'static str {
        match self {
            Tool::MkfsExt4 => "mkfs.ext4",
            Tool::E2fsck => "e2fsck",
            Tool::Resize2fs => "resize2fs",
            Tool::MkfsXfs => "mkfs.xfs",
            Tool::Modprobe => "modprobe",
            Tool::ThinDelta => "thin_delta",
        }
    }

    /// The Debian package that has it.
    pub fn package(self) -> &'static str {
        match self {
            Tool::MkfsExt4 | Tool::E2fsck | Tool::Resize2fs => "e2fsprogs",
            Tool::MkfsXfs => "xfsprogs",
            Tool::Modprobe => "kmod",
            Tool::ThinDelta => "thin-provisioning-tools",
        }
    }

    /// Where it is on PATH (plus the sbin directories, which a user's PATH
    /// may lack).
    pub fn find(self) -> Option<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
            .map(|d| d.join(self.program()))
            .find(|p| p.is_file())
    }

    /// Run it with `args` and collect its output. A missing program is
    /// ENOENT with a message that names the package to install.
    pub fn output<I, S>(self, args: I) -> io::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let prog = self.find().ok_or_else(|| self.missing())?;
        Command::new(prog).args(args).output()
    }

    /// Run it with `args` for `what`; a non-zero exit is
    /// [`Error::Tool`] with the tail of its stderr, a missing program
    /// ENOENT naming the package.
    pub fn run<I, S>(self, what: &str, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self
            .output(args)
            .ctx(|| format!("{what}: run {}", self.program()))?;
        if !out.status.success() {
            return Err(self.failed(what, &out));
        }
        Ok(out)
    }

    /// The error for a run of this tool that ended with `out`.
    pub fn failed(self, what: &str, out: &Output) -> Error {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.trim().lines().rev().take(3).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Error::Tool {
            what: what.to_string(),
            program: self.program(),
            status: match out.status.code() {
                Some(c) => format!("with code {c}"),
                None => "on a signal".to_string(),
            },
            stderr: crate::types::escape(&crate::types::cut(&tail.join(" / "), 400)).into_owned(),
        }
    }

    fn missing(self) -> io::Error {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{} is not installed (Debian package {})",
                self.program(),
                self.package()
            ),
        )
    }
}

/// The tools of `tools` that are missing, as one message (None: all there).
pub fn missing(tools: &[Tool]) -> Option<String> {
    let gone: Vec<String> = tools
        .iter()
        .filter(|t| t.find().is_none())
        .map(|t| format!("{} (package {})", t.program(), t.package()))
        .collect();
    (!gone.is_empty()).then(|| gone.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_run_says_what_which_program_exit_code_and_stderr_tail() {
        let out = Command::new("sh")
            .args([
                "-c",
                "echo one >&2; echo two >&2; echo 'three\x1b[31m' >&2; exit 3",
            ])
            .output()
            .unwrap();
        let e = Tool::Resize2fs.failed("grow the ext4 of a", &out);
        assert_eq!(e.errno(), libc::EIO);
        let m = e.to_string();
        assert!(
            m.starts_with("grow the ext4 of a: resize2fs exited with code 3: "),
            "{m}"
        );
        assert!(m.contains("one / two / three"), "{m}");
        assert!(!m.contains('\x1b'), "escape sequences are escaped: {m}");
    }
}
