//! The password file: one `username:hash` line per user, in Mosquitto's format.
//!
//! Accepted hashes:
//! - argon2id PHC strings, `$argon2id$v=19$m=19456,t=2,p=1$SALT$HASH` (what Bulwark writes);
//! - Mosquitto 2.x entries, `$7$ITERATIONS$SALT$HASH` (PBKDF2-HMAC-SHA512, standard base64,
//!   12-byte salt, 64-byte hash);
//! - Mosquitto 1.x entries, `$6$SALT$HASH` (one SHA-512 over password || salt).
//!
//! Mosquitto entries (and argon2id entries with weaker parameters than configured) verify as
//! they are and are rewritten as argon2id at the user's next successful login
//! ([`PasswordFile::upgrade`], done by [`Verifier`] on its own).
//!
//! Lines starting with `#` and blank lines are allowed and kept when the file is rewritten.
//! Everything else that is not a valid entry stops [`PasswordFile::load`] with an error naming
//! the file and the line (SECURITY-CASES A7), as does a file without users or a file that
//! group or others may read or write (F1). Rewrites are atomic (temp file created 0600 in
//! the same directory, fsync, rename, fsync of the directory) and refuse to overwrite a file
//! that someone else changed since it was read.
//!
//! Verification is constant-time where it matters: hash outputs are compared with
//! [`subtle`], and an unknown user (or a user with a cheap Mosquitto hash) costs an argon2id
//! computation with the configured parameters, like a known user with a wrong password.
//! [`Verifier`] runs the hashing on tokio's blocking pool with a bounded number of
//! verifications at once and a bounded queue, so a CONNECT flood cannot queue unbounded work.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use argon2::password_hash::phc::PasswordHash;
use argon2::{Algorithm, Argon2, PasswordHasher, Version};
use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

/// Longest username accepted, in bytes.
pub const MAX_USERNAME_LEN: usize = 256;
/// Largest password file read, in bytes.
pub const MAX_FILE_SIZE: u64 = 16 * 1024 * 1024;
/// OWASP minimum for argon2id: 19 MiB of memory ...
pub const MIN_MEMORY_KIB: u32 = 19_456;
/// ... and two passes.
pub const MIN_ITERATIONS: u32 = 2;
/// Upper bounds for configured and stored argon2id parameters: a typo (or a hostile entry)
/// must not make every login allocate gigabytes or run for minutes.
pub const MAX_MEMORY_KIB: u32 = 1024 * 1024;
pub const MAX_ITERATIONS: u32 = 100;
pub const MAX_PARALLELISM: u32 = 16;
/// Upper bound for the iteration count of a Mosquitto `$7$` entry (Mosquitto's default is 101).
pub const MAX_PBKDF2_ITERATIONS: u32 = 10_000_000;

const SHA512_LEN: usize = 64;
const ARGON2_OUTPUT_LEN: usize = 32;
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("{file}: cannot read the password file: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{file}: not a regular file; the password file must be a plain file")]
    NotAFile { file: PathBuf },
    #[error("{file} can be read or written by group or others (mode {mode:04o}); run `chmod 600 {file}` and make it owned by the user the broker runs as")]
    InsecureMode { file: PathBuf, mode: u32 },
    #[error("{file}: {size} bytes is larger than the {MAX_FILE_SIZE} bytes a password file may have; is this the right file?")]
    TooLarge { file: PathBuf, size: u64 },
    #[error("{file}: line {line}: {message}")]
    Line {
        file: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{file} has no users; add one with `bulwark-broker passwd add {file} USER`")]
    Empty { file: PathBuf },
    #[error("invalid username {user:?}: {reason}")]
    InvalidUsername { user: String, reason: &'static str },
    #[error("the password is empty; choose a non-empty password")]
    EmptyPassword,
    #[error("no user {user} in {file}; `bulwark-broker passwd list {file}` shows the users")]
    UnknownUser { file: PathBuf, user: String },
    #[error("the password given for {user} does not match the one stored in {file}")]
    WrongPassword { file: PathBuf, user: String },
    #[error("{file} was changed on disk since it was read (by `bulwark-broker passwd`, an editor or another broker?); read it again and repeat the change")]
    Changed { file: PathBuf },
    #[error("{file}: cannot write: {source}")]
    Write {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not upgrade the entry for {user} in {file}: {source}")]
    Upgrade {
        user: String,
        file: PathBuf,
        #[source]
        source: Box<PasswordError>,
    },
    #[error("password hashing failed: {0}")]
    Hash(String),
}

/// A setting of [`PasswordConfig`] that is out of range. `key` is the TOML key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct InvalidSetting {
    pub key: &'static str,
    pub message: String,
}

/// Bytes that must not be logged: a password. `Debug` prints `***`; the buffer is zeroed
/// when dropped.
#[derive(Clone, Default)]
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Secret {
        Secret(Zeroizing::new(bytes.into()))
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl From<&[u8]> for Secret {
    fn from(b: &[u8]) -> Secret {
        Secret::new(b)
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret::new(s.into_bytes())
    }
}

/// Outcome of a password check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The password is right. `upgrade`: the stored hash is a Mosquitto one, or argon2id with
    /// weaker parameters than configured, and should be rewritten ([`PasswordFile::upgrade`]).
    Accepted { upgrade: bool },
    /// Unknown user or wrong password (deliberately indistinguishable).
    Rejected,
}

impl Verdict {
    pub fn is_accepted(self) -> bool {
        matches!(self, Verdict::Accepted { .. })
    }
}

/// argon2id cost parameters for new hashes and for the unknown-user dummy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argon2Params {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for Argon2Params {
    /// The OWASP minimum: m = 19456 KiB, t = 2, p = 1.
    fn default() -> Self {
        Argon2Params {
            memory_kib: MIN_MEMORY_KIB,
            iterations: MIN_ITERATIONS,
            parallelism: 1,
        }
    }
}

impl Argon2Params {
    /// Checks the bounds: memory >= 19456 KiB, iterations >= 2, parallelism 1..=16 (and the
    /// upper bounds [`MAX_MEMORY_KIB`], [`MAX_ITERATIONS`]). Errors name the config key.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if !(MIN_MEMORY_KIB..=MAX_MEMORY_KIB).contains(&self.memory_kib) {
            return Err(InvalidSetting {
                key: "argon2_memory_kib",
                message: format!(
                    "{} is out of range; use {MIN_MEMORY_KIB} (19 MiB, the OWASP minimum) up to {MAX_MEMORY_KIB}",
                    self.memory_kib
                ),
            });
        }
        if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&self.iterations) {
            return Err(InvalidSetting {
                key: "argon2_iterations",
                message: format!(
                    "{} is out of range; use {MIN_ITERATIONS} (the OWASP minimum) up to {MAX_ITERATIONS}",
                    self.iterations
                ),
            });
        }
        if !(1..=MAX_PARALLELISM).contains(&self.parallelism) {
            return Err(InvalidSetting {
                key: "argon2_parallelism",
                message: format!(
                    "{} is out of range; use 1 up to {MAX_PARALLELISM}",
                    self.parallelism
                ),
            });
        }
        Ok(())
    }

    fn argon2_params(&self) -> Result<argon2::Params, PasswordError> {
        argon2::Params::new(
            self.memory_kib,
            self.iterations,
            self.parallelism,
            Some(ARGON2_OUTPUT_LEN),
        )
        .map_err(|e| PasswordError::Hash(format!("argon2 parameters {self:?}: {e}")))
    }

    /// Hashes `password` with a fresh random salt.
    fn hash(&self, password: &[u8]) -> Result<Argon2Hash, PasswordError> {
        let params = self.argon2_params()?;
        let phc = Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password(password)
            .map_err(|e| PasswordError::Hash(e.to_string()))?;
        Argon2Hash::parse(&phc.to_string()).map_err(PasswordError::Hash)
    }

    /// A hash nobody's password matches, costing what a real entry costs.
    fn dummy(&self) -> Result<Argon2Hash, PasswordError> {
        let random = || {
            argon2::password_hash::try_generate_salt()
                .map_err(|e| PasswordError::Hash(format!("no random numbers: {e}")))
        };
        let salt = random()?.to_vec();
        let mut hash = random()?.to_vec();
        hash.extend_from_slice(&random()?);
        Ok(Argon2Hash {
            encoded: String::new(),
            params: self.argon2_params()?,
            salt,
            hash,
        })
    }
}

/// The `[passwords]` settings (TOML; unknown keys are errors).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordConfig {
    /// The password file (`user:hash` lines), mode 0600.
    pub file: PathBuf,
    /// argon2id memory per hash, in KiB (default 19456 = 19 MiB, the OWASP minimum).
    #[serde(default = "default_memory_kib")]
    pub argon2_memory_kib: u32,
    /// argon2id passes (default 2).
    #[serde(default = "default_iterations")]
    pub argon2_iterations: u32,
    /// argon2id lanes (default 1).
    #[serde(default = "default_parallelism")]
    pub argon2_parallelism: u32,
    /// Password checks that run at once (each holds `argon2_memory_kib` of memory).
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent_verifications: usize,
    /// Password checks allowed to wait for a free slot; more are refused at once (Busy).
    #[serde(default = "default_max_pending")]
    pub max_pending_verifications: usize,
}

fn default_memory_kib() -> u32 {
    MIN_MEMORY_KIB
}
fn default_iterations() -> u32 {
    MIN_ITERATIONS
}
fn default_parallelism() -> u32 {
    1
}
fn default_max_concurrent() -> usize {
    2
}
fn default_max_pending() -> usize {
    64
}

impl PasswordConfig {
    /// The defaults, for `file`.
    pub fn new(file: impl Into<PathBuf>) -> PasswordConfig {
        PasswordConfig {
            file: file.into(),
            argon2_memory_kib: default_memory_kib(),
            argon2_iterations: default_iterations(),
            argon2_parallelism: default_parallelism(),
            max_concurrent_verifications: default_max_concurrent(),
            max_pending_verifications: default_max_pending(),
        }
    }

    pub fn argon2_params(&self) -> Argon2Params {
        Argon2Params {
            memory_kib: self.argon2_memory_kib,
            iterations: self.argon2_iterations,
            parallelism: self.argon2_parallelism,
        }
    }

    /// Checks every bound; the error names the key.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.file.as_os_str().is_empty() {
            return Err(InvalidSetting {
                key: "file",
                message: "is empty; name the password file, e.g. \"/etc/bulwark/passwd\""
                    .to_string(),
            });
        }
        self.argon2_params().validate()?;
        if !(1..=1024).contains(&self.max_concurrent_verifications) {
            return Err(InvalidSetting {
                key: "max_concurrent_verifications",
                message: format!(
                    "{} is out of range; use 1 up to 1024 (about the number of CPU cores)",
                    self.max_concurrent_verifications
                ),
            });
        }
        if self.max_pending_verifications > 100_000 {
            return Err(InvalidSetting {
                key: "max_pending_verifications",
                message: format!(
                    "{} is out of range; use 0 up to 100000",
                    self.max_pending_verifications
                ),
            });
        }
        Ok(())
    }

    /// Loads `file` with the configured argon2 parameters (see [`PasswordFile::load`]).
    pub fn load_file(&self) -> Result<PasswordFile, PasswordError> {
        PasswordFile::load_with_params(&self.file, self.argon2_params())
    }
}

/// Checks a username for the password file: non-empty, at most 256 bytes, no `:`, no
/// control characters, no leading or trailing whitespace, no leading `#` (a comment).
pub fn validate_username(user: &str) -> Result<(), PasswordError> {
    let reason = if user.is_empty() {
        Some("it is empty")
    } else if user.len() > MAX_USERNAME_LEN {
        Some("it is longer than 256 bytes")
    } else if user.contains(':') {
        Some("it contains ':', which separates the username from the hash")
    } else if user.chars().any(char::is_control) {
        Some("it contains a control character")
    } else if user.starts_with(char::is_whitespace) || user.ends_with(char::is_whitespace) {
        Some("it starts or ends with whitespace")
    } else if user.starts_with('#') {
        Some("it starts with '#', which marks a comment line")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(PasswordError::InvalidUsername {
            user: user.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// The kind of hash stored for a user (for `passwd list`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashKind {
    /// argon2id; `weaker` when its parameters are below the configured ones.
    Argon2id { weaker: bool },
    /// Mosquitto 2.x `$7$` (PBKDF2-HMAC-SHA512).
    MosquittoPbkdf2,
    /// Mosquitto 1.x `$6$` (one SHA-512).
    MosquittoSha512,
}

impl fmt::Display for HashKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HashKind::Argon2id { weaker: false } => "argon2id",
            HashKind::Argon2id { weaker: true } => {
                "argon2id with weaker parameters (rehashed at the next login)"
            }
            HashKind::MosquittoPbkdf2 => "mosquitto $7$ PBKDF2-SHA512 (rehashed at the next login)",
            HashKind::MosquittoSha512 => "mosquitto $6$ SHA-512 (rehashed at the next login)",
        })
    }
}

/// Whether [`PasswordFile::add_or_replace`] added a user or replaced a password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Added,
    Replaced,
}

#[derive(Clone)]
struct Argon2Hash {
    /// The PHC string as written in the file (empty for the dummy).
    encoded: String,
    params: argon2::Params,
    salt: Vec<u8>,
    hash: Vec<u8>,
}

impl Argon2Hash {
    fn parse(s: &str) -> Result<Argon2Hash, String> {
        let phc =
            PasswordHash::new(s).map_err(|e| format!("the argon2id hash does not parse: {e}"))?;
        if phc.algorithm.as_str() != "argon2id" {
            return Err("only argon2id hashes are accepted".to_string());
        }
        if phc.version != Some(0x13) {
            return Err("the argon2id hash must have version 19 ($argon2id$v=19$...)".to_string());
        }
        let params = argon2::Params::try_from(&phc)
            .map_err(|e| format!("the argon2id parameters do not parse: {e}"))?;
        if params.m_cost() > MAX_MEMORY_KIB
            || params.t_cost() > MAX_ITERATIONS
            || params.p_cost() > MAX_PARALLELISM
        {
            return Err(format!(
                "the argon2id parameters m={},t={},p={} exceed what this broker accepts (m <= {MAX_MEMORY_KIB}, t <= {MAX_ITERATIONS}, p <= {MAX_PARALLELISM}); set the password again with `bulwark-broker passwd add`",
                params.m_cost(),
                params.t_cost(),
                params.p_cost()
            ));
        }
        let (Some(salt), Some(hash)) = (&phc.salt, &phc.hash) else {
            return Err("the argon2id hash lacks its salt or its hash part".to_string());
        };
        if hash.len() < 16 {
            return Err("the argon2id hash output is shorter than 16 bytes".to_string());
        }
        Ok(Argon2Hash {
            encoded: s.to_string(),
            params,
            salt: salt.as_ref().to_vec(),
            hash: hash.as_ref().to_vec(),
        })
    }

    fn matches(&self, password: &[u8]) -> bool {
        let mut out = Zeroizing::new(vec![0u8; self.hash.len()]);
        let hasher = Argon2::new(Algorithm::Argon2id, Version::V0x13, self.params.clone());
        match hasher.hash_password_into(password, &self.salt, &mut out) {
            Ok(()) => out.as_slice().ct_eq(&self.hash).into(),
            Err(_) => false,
        }
    }

    fn weaker_than(&self, configured: &Argon2Params) -> bool {
        self.params.m_cost() < configured.memory_kib
            || self.params.t_cost() < configured.iterations
            || self.hash.len() < ARGON2_OUTPUT_LEN
    }
}

#[derive(Clone)]
enum StoredHash {
    Argon2id(Argon2Hash),
    /// Mosquitto 2.x: `$7$ITERATIONS$SALT$HASH`.
    Pbkdf2 {
        encoded: String,
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    /// Mosquitto 1.x: `$6$SALT$HASH`.
    Sha512 {
        encoded: String,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

fn decode_b64(s: &str, what: &str) -> Result<Vec<u8>, String> {
    B64.decode(s)
        .map_err(|_| format!("the {what} is not valid base64"))
}

impl StoredHash {
    /// Parses the part after `user:`. Error messages never repeat the text: a line that is
    /// not a hash may be a plain-text password.
    fn parse(s: &str) -> Result<StoredHash, String> {
        if s.is_empty() {
            return Err("no hash after ':'; expected USER:HASH".to_string());
        }
        if s.trim() != s {
            return Err("whitespace around the hash; remove it".to_string());
        }
        if s.starts_with("$argon2id$") {
            return Argon2Hash::parse(s).map(StoredHash::Argon2id);
        }
        if s.starts_with("$argon2i$") || s.starts_with("$argon2d$") {
            return Err("argon2i and argon2d hashes are not accepted, only argon2id; set the password again with `bulwark-broker passwd add`".to_string());
        }
        if let Some(rest) = s.strip_prefix("$7$") {
            let parts: Vec<&str> = rest.split('$').collect();
            let [iterations, salt, hash] = parts[..] else {
                return Err("a Mosquitto $7$ hash has the form $7$ITERATIONS$SALT$HASH".to_string());
            };
            let iterations = iterations
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=MAX_PBKDF2_ITERATIONS).contains(n))
                .ok_or_else(|| {
                    format!("the $7$ iteration count must be a number from 1 to {MAX_PBKDF2_ITERATIONS}")
                })?;
            let salt = decode_b64(salt, "$7$ salt")?;
            let hash = decode_b64(hash, "$7$ hash")?;
            check_mosquitto_lengths(&salt, &hash, "$7$")?;
            return Ok(StoredHash::Pbkdf2 {
                encoded: s.to_string(),
                iterations,
                salt,
                hash,
            });
        }
        if let Some(rest) = s.strip_prefix("$6$") {
            let parts: Vec<&str> = rest.split('$').collect();
            let [salt, hash] = parts[..] else {
                return Err("a Mosquitto $6$ hash has the form $6$SALT$HASH".to_string());
            };
            let salt = decode_b64(salt, "$6$ salt")?;
            let hash = decode_b64(hash, "$6$ hash")?;
            check_mosquitto_lengths(&salt, &hash, "$6$")?;
            return Ok(StoredHash::Sha512 {
                encoded: s.to_string(),
                salt,
                hash,
            });
        }
        Err("the hash is in no known format (a plain-text password? hash it with `bulwark-broker passwd add`); expected $argon2id$v=19$..., or Mosquitto's $7$... or $6$...".to_string())
    }

    fn encoded(&self) -> &str {
        match self {
            StoredHash::Argon2id(h) => &h.encoded,
            StoredHash::Pbkdf2 { encoded, .. } | StoredHash::Sha512 { encoded, .. } => encoded,
        }
    }

    fn kind(&self, configured: &Argon2Params) -> HashKind {
        match self {
            StoredHash::Argon2id(h) => HashKind::Argon2id {
                weaker: h.weaker_than(configured),
            },
            StoredHash::Pbkdf2 { .. } => HashKind::MosquittoPbkdf2,
            StoredHash::Sha512 { .. } => HashKind::MosquittoSha512,
        }
    }
}

fn check_mosquitto_lengths(salt: &[u8], hash: &[u8], kind: &str) -> Result<(), String> {
    if salt.is_empty() || salt.len() > 64 {
        return Err(format!("the {kind} salt must be 1 to 64 bytes"));
    }
    if hash.len() != SHA512_LEN {
        return Err(format!(
            "the {kind} hash must be {SHA512_LEN} bytes (SHA-512)"
        ));
    }
    Ok(())
}

/// Checks `password` against `stored`, or against `dummy` when there is no such user. Every
/// path runs one argon2id computation at least as costly as the configured one (legacy
/// entries run the dummy as well), so timing tells nothing about whether the user exists.
fn verify_stored(
    stored: Option<&StoredHash>,
    dummy: &Argon2Hash,
    configured: &Argon2Params,
    password: &[u8],
) -> Verdict {
    let (ok, upgrade) = match stored {
        Some(StoredHash::Argon2id(h)) => (h.matches(password), h.weaker_than(configured)),
        Some(StoredHash::Pbkdf2 {
            iterations,
            salt,
            hash,
            ..
        }) => {
            let mut out = Zeroizing::new([0u8; SHA512_LEN]);
            pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, out.as_mut_slice());
            let ok: bool = out.as_slice().ct_eq(hash).into();
            std::hint::black_box(dummy.matches(password));
            (ok, true)
        }
        Some(StoredHash::Sha512 { salt, hash, .. }) => {
            let mut out = Zeroizing::new([0u8; SHA512_LEN]);
            out.copy_from_slice(
                &Sha512::new()
                    .chain_update(password)
                    .chain_update(salt)
                    .finalize(),
            );
            let ok: bool = out.as_slice().ct_eq(hash).into();
            std::hint::black_box(dummy.matches(password));
            (ok, true)
        }
        None => {
            std::hint::black_box(dummy.matches(password));
            (false, false)
        }
    };
    if ok {
        Verdict::Accepted { upgrade }
    } else {
        Verdict::Rejected
    }
}

/// One line of the file: an entry, or a comment or blank line kept verbatim.
#[derive(Clone)]
enum Line {
    Other(String),
    Entry { user: String, hash: StoredHash },
}

/// What a verification needs, copied out of the file so that hashing runs without a lock.
struct Candidate {
    file: PathBuf,
    user: String,
    stored: Option<StoredHash>,
    dummy: Argon2Hash,
    params: Argon2Params,
}

impl Candidate {
    fn verify(&self, password: &[u8]) -> Verdict {
        verify_stored(self.stored.as_ref(), &self.dummy, &self.params, password)
    }
}

/// The password file in memory. See the module documentation.
pub struct PasswordFile {
    path: PathBuf,
    params: Argon2Params,
    lines: Vec<Line>,
    /// username → index into `lines`.
    index: HashMap<String, usize>,
    dummy: Argon2Hash,
    /// SHA-512 of the file as last read or written; `None` when it did not exist.
    on_disk: Option<[u8; 64]>,
}

impl fmt::Debug for PasswordFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasswordFile")
            .field("path", &self.path)
            .field("users", &self.index.len())
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

/// Refuses a password file that group or others may read or write (F1), or that is not a
/// regular file.
pub fn check_mode(path: &Path) -> Result<(), PasswordError> {
    let meta = fs::metadata(path).map_err(|source| PasswordError::Read {
        file: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(PasswordError::NotAFile {
            file: path.to_path_buf(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(PasswordError::InsecureMode {
            file: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

fn digest(bytes: &[u8]) -> [u8; 64] {
    Sha512::digest(bytes).into()
}

/// Reads the file, or `None` if it does not exist.
fn read_bounded(path: &Path) -> Result<Option<Vec<u8>>, PasswordError> {
    let read_err = |source| PasswordError::Read {
        file: path.to_path_buf(),
        source,
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read_err(e)),
    };
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(PasswordError::NotAFile {
            file: path.to_path_buf(),
        });
    }
    if meta.len() > MAX_FILE_SIZE {
        return Err(PasswordError::TooLarge {
            file: path.to_path_buf(),
            size: meta.len(),
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(MAX_FILE_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_FILE_SIZE {
        return Err(PasswordError::TooLarge {
            file: path.to_path_buf(),
            size: bytes.len() as u64,
        });
    }
    Ok(Some(bytes))
}

fn parse_lines(
    bytes: &[u8],
    file: &Path,
) -> Result<(Vec<Line>, HashMap<String, usize>), PasswordError> {
    let mut lines = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    // Line numbers of the entries, for the duplicate message.
    let mut line_of: HashMap<String, usize> = HashMap::new();
    let mut pieces: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
    if pieces.last().is_some_and(|p| p.is_empty()) {
        pieces.pop();
    }
    for (i, raw) in pieces.into_iter().enumerate() {
        let n = i + 1;
        let err = |message: String| PasswordError::Line {
            file: file.to_path_buf(),
            line: n,
            message,
        };
        let text = std::str::from_utf8(raw).map_err(|_| err("not valid UTF-8".to_string()))?;
        let text = text.strip_suffix('\r').unwrap_or(text);
        if text.trim().is_empty() || text.trim_start().starts_with('#') {
            lines.push(Line::Other(text.to_string()));
            continue;
        }
        let Some((user, hash)) = text.split_once(':') else {
            return Err(err(
                "no ':' on this line; expected USER:HASH (add users with `bulwark-broker passwd add`)"
                    .to_string(),
            ));
        };
        if user.trim().is_empty() {
            return Err(err("blank username before ':'".to_string()));
        }
        if let Err(PasswordError::InvalidUsername { reason, .. }) = validate_username(user) {
            return Err(err(format!("invalid username: {reason}")));
        }
        let hash = StoredHash::parse(hash).map_err(|m| err(format!("user {user}: {m}")))?;
        if let Some(first) = line_of.get(user) {
            return Err(err(format!(
                "user {user} is already defined on line {first}; remove one of the two lines"
            )));
        }
        line_of.insert(user.to_string(), n);
        index.insert(user.to_string(), lines.len());
        lines.push(Line::Entry {
            user: user.to_string(),
            hash,
        });
    }
    Ok((lines, index))
}

fn serialize(lines: &[Line]) -> Vec<u8> {
    let mut out = String::new();
    for line in lines {
        match line {
            Line::Other(text) => out.push_str(text),
            Line::Entry { user, hash } => {
                out.push_str(user);
                out.push(':');
                out.push_str(hash.encoded());
            }
        }
        out.push('\n');
    }
    out.into_bytes()
}

fn build_index(lines: &[Line]) -> HashMap<String, usize> {
    lines
        .iter()
        .enumerate()
        .filter_map(|(i, l)| match l {
            Line::Entry { user, .. } => Some((user.clone(), i)),
            Line::Other(_) => None,
        })
        .collect()
}

impl PasswordFile {
    /// Loads `path` for the broker, with the default argon2 parameters.
    pub fn load(path: &Path) -> Result<PasswordFile, PasswordError> {
        PasswordFile::load_with_params(path, Argon2Params::default())
    }

    /// Loads `path` for the broker: refuses a file that group or others may access, any
    /// malformed line (the error names the line) and a file without users. `params` are
    /// used for new hashes, for the unknown-user dummy and to decide upgrades.
    pub fn load_with_params(
        path: &Path,
        params: Argon2Params,
    ) -> Result<PasswordFile, PasswordError> {
        check_mode(path)?;
        let file = PasswordFile::read(path, params, false)?;
        if file.index.is_empty() {
            return Err(PasswordError::Empty {
                file: path.to_path_buf(),
            });
        }
        Ok(file)
    }

    /// Opens an existing file for editing (`passwd delete`, `passwd list`): no mode check
    /// (a rewrite makes it 0600) and no users is fine.
    pub fn open_for_edit(path: &Path, params: Argon2Params) -> Result<PasswordFile, PasswordError> {
        PasswordFile::read(path, params, false)
    }

    /// Like [`PasswordFile::open_for_edit`], but a missing file is an empty one, created by
    /// [`PasswordFile::save`] (`passwd add`).
    pub fn open_or_create(
        path: &Path,
        params: Argon2Params,
    ) -> Result<PasswordFile, PasswordError> {
        PasswordFile::read(path, params, true)
    }

    fn read(
        path: &Path,
        params: Argon2Params,
        may_be_missing: bool,
    ) -> Result<PasswordFile, PasswordError> {
        let (lines, index, on_disk) = match read_bounded(path)? {
            Some(bytes) => {
                let (lines, index) = parse_lines(&bytes, path)?;
                (lines, index, Some(digest(&bytes)))
            }
            None if may_be_missing => (Vec::new(), HashMap::new(), None),
            None => {
                return Err(PasswordError::Read {
                    file: path.to_path_buf(),
                    source: io::Error::from(io::ErrorKind::NotFound),
                })
            }
        };
        Ok(PasswordFile {
            path: path.to_path_buf(),
            params,
            lines,
            index,
            dummy: params.dummy()?,
            on_disk,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn params(&self) -> Argon2Params {
        self.params
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Whether the file existed when it was read (or has been saved since).
    pub fn exists_on_disk(&self) -> bool {
        self.on_disk.is_some()
    }

    /// The usernames, in file order.
    pub fn users(&self) -> Vec<&str> {
        self.lines
            .iter()
            .filter_map(|l| match l {
                Line::Entry { user, .. } => Some(user.as_str()),
                Line::Other(_) => None,
            })
            .collect()
    }

    pub fn contains(&self, user: &str) -> bool {
        self.index.contains_key(user)
    }

    pub fn hash_kind(&self, user: &str) -> Option<HashKind> {
        self.stored(user).map(|h| h.kind(&self.params))
    }

    fn stored(&self, user: &str) -> Option<&StoredHash> {
        match self.index.get(user).map(|&i| &self.lines[i]) {
            Some(Line::Entry { hash, .. }) => Some(hash),
            _ => None,
        }
    }

    fn candidate(&self, user: &str) -> Candidate {
        Candidate {
            file: self.path.clone(),
            user: user.to_string(),
            stored: self.stored(user).cloned(),
            dummy: self.dummy.clone(),
            params: self.params,
        }
    }

    /// Checks `password` for `user`. Unknown users and wrong passwords cost the same and give
    /// the same answer. Blocks for one argon2id computation: call it off the async runtime
    /// (or use [`Verifier`]).
    pub fn verify(&self, user: &str, password: &[u8]) -> Verdict {
        verify_stored(self.stored(user), &self.dummy, &self.params, password)
    }

    /// Re-hashes `user`'s entry as argon2id with the configured parameters and rewrites the
    /// file atomically. The password must be the right one. On any failure the file and
    /// the entry in memory stay as they were; the error reads "could not upgrade the entry
    /// for USER in FILE: ...".
    pub fn upgrade(&mut self, user: &str, password: &[u8]) -> Result<(), PasswordError> {
        let cand = self.candidate(user);
        let wrap = |source: PasswordError| PasswordError::Upgrade {
            user: user.to_string(),
            file: self.path.clone(),
            source: Box::new(source),
        };
        let Some(stored) = &cand.stored else {
            return Err(wrap(PasswordError::UnknownUser {
                file: self.path.clone(),
                user: user.to_string(),
            }));
        };
        if !cand.verify(password).is_accepted() {
            return Err(wrap(PasswordError::WrongPassword {
                file: self.path.clone(),
                user: user.to_string(),
            }));
        }
        let new = self.params.hash(password).map_err(wrap)?;
        self.apply_upgrade(user, stored.encoded(), new)
    }

    /// Replaces `user`'s entry by `new` if it still is `old`, and writes the file.
    fn apply_upgrade(
        &mut self,
        user: &str,
        old: &str,
        new: Argon2Hash,
    ) -> Result<(), PasswordError> {
        let wrap = |source: PasswordError| PasswordError::Upgrade {
            user: user.to_string(),
            file: self.path.clone(),
            source: Box::new(source),
        };
        let Some(&i) = self.index.get(user) else {
            return Err(wrap(PasswordError::UnknownUser {
                file: self.path.clone(),
                user: user.to_string(),
            }));
        };
        if self.stored(user).map(StoredHash::encoded) != Some(old) {
            // Replaced or reloaded meanwhile: the newer entry wins.
            return Err(wrap(PasswordError::Changed {
                file: self.path.clone(),
            }));
        }
        let mut lines = self.lines.clone();
        lines[i] = Line::Entry {
            user: user.to_string(),
            hash: StoredHash::Argon2id(new),
        };
        let written = write_checked(&self.path, self.on_disk, &serialize(&lines)).map_err(wrap)?;
        self.lines = lines;
        self.on_disk = Some(written);
        Ok(())
    }

    /// Sets `user`'s password (argon2id, configured parameters), in memory; [`save`] writes.
    ///
    /// [`save`]: PasswordFile::save
    pub fn add_or_replace(&mut self, user: &str, password: &[u8]) -> Result<Change, PasswordError> {
        validate_username(user)?;
        if password.is_empty() {
            return Err(PasswordError::EmptyPassword);
        }
        let hash = StoredHash::Argon2id(self.params.hash(password)?);
        let line = Line::Entry {
            user: user.to_string(),
            hash,
        };
        match self.index.get(user) {
            Some(&i) => {
                self.lines[i] = line;
                Ok(Change::Replaced)
            }
            None => {
                self.index.insert(user.to_string(), self.lines.len());
                self.lines.push(line);
                Ok(Change::Added)
            }
        }
    }

    /// Removes `user`, in memory; [`save`](PasswordFile::save) writes.
    pub fn delete(&mut self, user: &str) -> Result<(), PasswordError> {
        let Some(i) = self.index.get(user).copied() else {
            return Err(PasswordError::UnknownUser {
                file: self.path.clone(),
                user: user.to_string(),
            });
        };
        self.lines.remove(i);
        self.index = build_index(&self.lines);
        Ok(())
    }

    /// Writes the file atomically with mode 0600, keeping its owner. Refuses (Changed) if
    /// the file on disk is no longer the one that was read.
    pub fn save(&mut self) -> Result<(), PasswordError> {
        let written = write_checked(&self.path, self.on_disk, &serialize(&self.lines))?;
        self.on_disk = Some(written);
        Ok(())
    }
}

/// Replaces `path` with `contents` if the file on disk still has the digest `expected`
/// (`None`: it must not exist). Returns the digest of `contents`.
fn write_checked(
    path: &Path,
    expected: Option<[u8; 64]>,
    contents: &[u8],
) -> Result<[u8; 64], PasswordError> {
    // Write through a symlink to its target rather than replacing the link.
    let target = match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            fs::canonicalize(path).map_err(|source| PasswordError::Write {
                file: path.to_path_buf(),
                source,
            })?
        }
        _ => path.to_path_buf(),
    };
    let current = read_bounded(&target)?;
    if current.as_deref().map(digest) != expected {
        return Err(PasswordError::Changed {
            file: path.to_path_buf(),
        });
    }
    let owner = match fs::metadata(&target) {
        Ok(m) => Some((m.uid(), m.gid())),
        Err(_) => None,
    };
    atomic_write(&target, contents, owner).map_err(|source| PasswordError::Write {
        file: path.to_path_buf(),
        source,
    })?;
    Ok(digest(contents))
}

/// Temp file created 0600 in the same directory (with `owner`, if given), write, fsync,
/// rename over `path`, fsync the directory.
fn atomic_write(path: &Path, contents: &[u8], owner: Option<(u32, u32)>) -> io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file path"))?
        .to_string_lossy();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    let write = |file: &mut File| -> io::Result<()> {
        // Exactly 0600, whatever the umask.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        if let Some((uid, gid)) = owner {
            let meta = file.metadata()?;
            if (meta.uid(), meta.gid()) != (uid, gid) {
                std::os::unix::fs::fchown(&*file, Some(uid), Some(gid)).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("cannot keep the file's owner {uid}:{gid} ({e}); run this as that user or as root"),
                    )
                })?;
            }
        }
        file.write_all(contents)?;
        file.sync_all()
    };
    let result = write(&mut file).and_then(|()| {
        drop(file);
        fs::rename(&tmp, path)
    });
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    // The new file is in place; a failed directory fsync cannot be undone, so it only warns.
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(file = %path.display(), error = %e, "password file written, but the directory could not be synced");
    }
    Ok(())
}

/// Returned by [`Verifier::verify`] when too many verifications are already waiting:
/// refuse the connection (CONNACK "server unavailable") rather than queue more work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many password verifications are waiting; try again later")]
pub struct Busy;

/// The async front end for connection tasks: hashing runs on tokio's blocking pool, at most
/// `max_concurrent_verifications` at once, with at most `max_pending_verifications` waiting.
/// Upgrades of Mosquitto (or weaker argon2id) entries happen on their own after a successful
/// login; a failed upgrade is logged as a warning and the login still succeeds.
#[derive(Debug, Clone)]
pub struct Verifier {
    file: Arc<RwLock<PasswordFile>>,
    slots: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    max_pending: usize,
}

/// Decrements the waiting count when a waiter gets its slot or is cancelled.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Verifier {
    pub fn new(file: Arc<RwLock<PasswordFile>>, config: &PasswordConfig) -> Verifier {
        Verifier {
            file,
            slots: Arc::new(Semaphore::new(config.max_concurrent_verifications.max(1))),
            waiting: Arc::new(AtomicUsize::new(0)),
            max_pending: config.max_pending_verifications,
        }
    }

    /// The shared password file (replace its contents to reload).
    pub fn file(&self) -> &Arc<RwLock<PasswordFile>> {
        &self.file
    }

    /// Checks `password` for `user` off the runtime. `Err(Busy)` at once when
    /// `max_pending_verifications` checks are already waiting for a slot. An
    /// `Accepted { upgrade: true }` verdict has already been acted on (entry upgraded, or a
    /// warning logged).
    pub async fn verify(&self, user: &str, password: &[u8]) -> Result<Verdict, Busy> {
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let max = self.max_pending;
                self.waiting
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < max).then_some(n + 1)
                    })
                    .map_err(|_| Busy)?;
                let waiting = Waiting(&self.waiting);
                let permit = self.slots.clone().acquire_owned().await.map_err(|_| Busy)?;
                drop(waiting);
                permit
            }
        };
        let cand = read_lock(&self.file).candidate(user);
        let password = Secret::new(password);
        let file = self.file.clone();
        let job = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let verdict = cand.verify(password.expose());
            if verdict == (Verdict::Accepted { upgrade: true }) {
                if let Err(e) = upgrade_entry(&file, &cand, &password) {
                    tracing::warn!(user = %cand.user, error = %e, "password entry not upgraded; the login proceeds with the old hash");
                } else {
                    tracing::info!(user = %cand.user, file = %cand.file.display(), "password entry upgraded to argon2id");
                }
            }
            verdict
        });
        match job.await {
            Ok(v) => Ok(v),
            Err(e) => {
                tracing::error!(error = %e, "password verification task failed; rejecting");
                Ok(Verdict::Rejected)
            }
        }
    }
}

fn read_lock(file: &RwLock<PasswordFile>) -> std::sync::RwLockReadGuard<'_, PasswordFile> {
    file.read().unwrap_or_else(|e| e.into_inner())
}

fn upgrade_entry(
    file: &RwLock<PasswordFile>,
    cand: &Candidate,
    password: &Secret,
) -> Result<(), PasswordError> {
    let wrap = |source: PasswordError| PasswordError::Upgrade {
        user: cand.user.clone(),
        file: cand.file.clone(),
        source: Box::new(source),
    };
    let Some(old) = &cand.stored else {
        return Err(wrap(PasswordError::UnknownUser {
            file: cand.file.clone(),
            user: cand.user.clone(),
        }));
    };
    // Hash outside the lock; only the short rewrite holds it.
    let new = cand.params.hash(password.expose()).map_err(wrap)?;
    let mut guard = file.write().unwrap_or_else(|e| e.into_inner());
    guard.apply_upgrade(&cand.user, old.encoded(), new)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made with mosquitto_passwd 2.0.11 (`-c -b`, `-H sha512 -b`, `-H sha512-pbkdf2 -I 1000 -b`).
    const ALICE_7: &str = "$7$101$pmGyyux1atg+h1jm$yrC1nH7pjTbVvDR244QK/SKLRfAsohM2Y+rPtM05t1ouOq9VGfU0gHMoouEO05FPrL+v3795CMhDsbUQFjjPDA==";
    const BOB_6: &str = "$6$sFbJgWdCx9YT7YVZ$1MAqBmU8GMfUgn+9PKAQitL2I02bv+7PdF4sDtQ98yP7FnyLhSpafylBvfh8E5uwpGE6d8u3XqhRyu3oxENc0Q==";
    const CAROL_7_1000: &str = "$7$1000$IqdUeymnUvED2A2l$oU/Y6IpS60Pb2hVXwBsqQBtRqOHac9OCzMNI/9m0IRSI55Co+luxk99h6B3/BfZ98RfdQw54PSxVaze7jzkrmg==";

    fn write_file(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let path = dir.join("passwd");
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn load_text(text: &str) -> Result<PasswordFile, PasswordError> {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), text, 0o600);
        PasswordFile::load(&path)
    }

    fn line_error(text: &str) -> (usize, String) {
        match load_text(text) {
            Err(e @ PasswordError::Line { line, .. }) => (line, e.to_string()),
            other => panic!("expected a line error for {text:?}, got {other:?}"),
        }
    }

    fn argon2_line(user: &str, password: &str) -> String {
        let h = Argon2Params::default().hash(password.as_bytes()).unwrap();
        format!("{user}:{}", h.encoded)
    }

    #[test]
    fn parse_errors_name_the_file_and_line() {
        let good = format!("alice:{ALICE_7}\n");
        let cases: Vec<(String, usize, &str)> = vec![
            (format!("{good}:{BOB_6}\n"), 2, "blank username"),
            (format!("{good}   :   \n"), 2, "blank username"),
            (format!("# c\n{good}bob\n"), 3, "no ':'"),
            (format!("{good}bob:secret\n"), 2, "no known format"),
            (format!("{good}bob:\n"), 2, "no hash"),
            (format!("{good}bob:{BOB_6} \n"), 2, "whitespace"),
            (format!("{good}\nalice:{BOB_6}\n"), 3, "already defined on line 1"),
            (format!("{good}bob:$argon2id$v=19$m=19456,t=2,p=1$bad\n"), 2, "does not parse"),
            (format!("{good}bob:$argon2id$v=19$m=19456,t=2,p=1,x=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA\n"), 2, "parameters do not parse"),
            (format!("{good}bob:$argon2i$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA\n"), 2, "only argon2id"),
            (format!("{good}bob:$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ\n"), 2, "lacks"),
            (format!("{good}bob:$argon2id$v=19$m=4194304,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA\n"), 2, "exceed"),
            (format!("{good}bob:$7$0$pmGyyux1atg+h1jm$AAAA\n"), 2, "iteration count"),
            (format!("{good}bob:$7$101$pmGyyux1atg+h1jm$AAAA\n"), 2, "64 bytes"),
            (format!("{good}bob:$6$!!!$AAAA\n"), 2, "not valid base64"),
            (format!("{good}bob:$6$abc\n"), 2, "$6$SALT$HASH"),
            (format!("{good} bob:{BOB_6}\n"), 2, "whitespace"),
            (format!("{good}bo\x07b:{BOB_6}\n"), 2, "control character"),
        ];
        for (text, line, needle) in cases {
            let (got_line, msg) = line_error(&text);
            assert_eq!(got_line, line, "{msg}");
            assert!(msg.contains(&format!("line {line}:")), "{msg}");
            assert!(msg.contains("passwd"), "names the file: {msg}");
            assert!(msg.contains(needle), "{needle:?} not in {msg}");
        }
    }

    #[test]
    fn plain_text_password_is_not_echoed() {
        let (_, msg) = line_error("alice:Sup3rSecretPw\n");
        assert!(!msg.contains("Sup3rSecretPw"), "{msg}");
    }

    #[test]
    fn invalid_utf8_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        let mut bytes = format!("alice:{ALICE_7}\n").into_bytes();
        bytes.extend_from_slice(b"b\xffb:x\n");
        fs::write(&path, bytes).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let msg = PasswordFile::load(&path).unwrap_err().to_string();
        assert!(msg.contains("line 2: not valid UTF-8"), "{msg}");
    }

    #[test]
    fn comments_blank_lines_and_crlf_are_accepted() {
        let f = load_text(&format!(
            "# plant users\n\n   \nalice:{ALICE_7}\r\n  # indented comment\nbob:{BOB_6}\n"
        ))
        .unwrap();
        assert_eq!(f.users(), vec!["alice", "bob"]);
        assert_eq!(f.len(), 2);
    }

    #[test]
    fn empty_file_is_an_error() {
        for text in ["", "\n", "# only a comment\n"] {
            let msg = load_text(text).unwrap_err().to_string();
            assert!(msg.contains("has no users"), "{msg}");
            assert!(msg.contains("bulwark-broker passwd add"), "{msg}");
        }
    }

    #[test]
    fn mode_check_refuses_group_and_other_access() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620, 0o602] {
            let path = write_file(dir.path(), &format!("alice:{ALICE_7}\n"), mode);
            let e = PasswordFile::load(&path).unwrap_err();
            assert!(matches!(e, PasswordError::InsecureMode { .. }), "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("chmod 600 {}", path.display())),
                "{msg}"
            );
        }
        let path = write_file(dir.path(), &format!("alice:{ALICE_7}\n"), 0o600);
        PasswordFile::load(&path).unwrap();
        let path = write_file(dir.path(), &format!("alice:{ALICE_7}\n"), 0o400);
        PasswordFile::load(&path).unwrap();
    }

    #[test]
    fn missing_file_and_directory_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let e = PasswordFile::load(&dir.path().join("nope")).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        let e = PasswordFile::load(dir.path()).unwrap_err();
        assert!(matches!(e, PasswordError::NotAFile { .. }), "{e}");
    }

    #[test]
    fn verifies_mosquitto_7_and_6_entries() {
        let f = load_text(&format!(
            "alice:{ALICE_7}\nbob:{BOB_6}\ncarol:{CAROL_7_1000}\n"
        ))
        .unwrap();
        let up = Verdict::Accepted { upgrade: true };
        assert_eq!(f.verify("alice", b"secret1"), up);
        assert_eq!(f.verify("bob", b"secret2"), up);
        assert_eq!(f.verify("carol", b"s3"), up);
        assert_eq!(f.verify("alice", b"secret2"), Verdict::Rejected);
        assert_eq!(f.verify("bob", b"secret1"), Verdict::Rejected);
        assert_eq!(f.verify("carol", b""), Verdict::Rejected);
        assert_eq!(f.verify("dave", b"secret1"), Verdict::Rejected);
        assert_eq!(f.hash_kind("alice"), Some(HashKind::MosquittoPbkdf2));
        assert_eq!(f.hash_kind("bob"), Some(HashKind::MosquittoSha512));
    }

    #[test]
    fn verifies_argon2id_entries_and_flags_weaker_ones() {
        let weak = Argon2Params {
            memory_kib: 1024,
            iterations: 1,
            parallelism: 1,
        }
        .hash(b"weak pw")
        .unwrap();
        let text = format!(
            "{}\nweak:{}\n",
            argon2_line("alice", "correct horse"),
            weak.encoded
        );
        let f = load_text(&text).unwrap();
        assert_eq!(
            f.verify("alice", b"correct horse"),
            Verdict::Accepted { upgrade: false }
        );
        assert_eq!(f.verify("alice", b"correct horse "), Verdict::Rejected);
        assert_eq!(
            f.verify("weak", b"weak pw"),
            Verdict::Accepted { upgrade: true }
        );
        assert_eq!(f.verify("nobody", b"correct horse"), Verdict::Rejected);
        // A stronger configuration makes the default-strength entry an upgrade candidate.
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), &text, 0o600);
        let stronger = Argon2Params {
            iterations: 3,
            ..Argon2Params::default()
        };
        let f = PasswordFile::load_with_params(&path, stronger).unwrap();
        assert_eq!(
            f.verify("alice", b"correct horse"),
            Verdict::Accepted { upgrade: true }
        );
    }

    #[test]
    fn upgrade_rewrites_as_argon2id_with_mode_0600_and_keeps_comments() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(
            dir.path(),
            &format!("# header\nalice:{ALICE_7}\n\nbob:{BOB_6}\n"),
            0o600,
        );
        let mut f = PasswordFile::load(&path).unwrap();
        f.upgrade("alice", b"secret1").unwrap();
        let text = fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "# header");
        assert!(
            lines[1].starts_with("alice:$argon2id$v=19$m=19456,t=2,p=1$"),
            "{text}"
        );
        assert_eq!(lines[2], "");
        assert_eq!(lines[3], format!("bob:{BOB_6}"));
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            f.verify("alice", b"secret1"),
            Verdict::Accepted { upgrade: false }
        );
        assert_eq!(f.verify("alice", b"secret2"), Verdict::Rejected);
        let again = PasswordFile::load(&path).unwrap();
        assert_eq!(
            again.verify("alice", b"secret1"),
            Verdict::Accepted { upgrade: false }
        );
        // No temp files left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn upgrade_with_wrong_password_or_unknown_user_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("alice:{ALICE_7}\n");
        let path = write_file(dir.path(), &text, 0o600);
        let mut f = PasswordFile::load(&path).unwrap();
        let msg = f.upgrade("alice", b"wrong").unwrap_err().to_string();
        assert!(
            msg.contains("could not upgrade the entry for alice in"),
            "{msg}"
        );
        assert!(!msg.contains("wrong\""), "{msg}");
        let msg = f.upgrade("zed", b"secret1").unwrap_err().to_string();
        assert!(msg.contains("no user zed"), "{msg}");
        assert_eq!(fs::read_to_string(&path).unwrap(), text);
    }

    #[test]
    fn failed_upgrade_leaves_memory_and_disk_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("etc");
        fs::create_dir(&sub).unwrap();
        let text = format!("bob:{BOB_6}\n");
        let path = write_file(&sub, &text, 0o600);
        let mut f = PasswordFile::load(&path).unwrap();
        // A read-only directory stops the rewrite, unless we are root; then take the
        // directory away altogether.
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o500)).unwrap();
        let root = File::create(sub.join("probe")).is_ok();
        if root {
            fs::set_permissions(&sub, fs::Permissions::from_mode(0o700)).unwrap();
            fs::remove_dir_all(&sub).unwrap();
        }
        let msg = f.upgrade("bob", b"secret2").unwrap_err().to_string();
        assert!(
            msg.starts_with(&format!(
                "could not upgrade the entry for bob in {}: ",
                path.display()
            )),
            "{msg}"
        );
        assert_eq!(
            f.verify("bob", b"secret2"),
            Verdict::Accepted { upgrade: true }
        );
        if !root {
            fs::set_permissions(&sub, fs::Permissions::from_mode(0o700)).unwrap();
            assert_eq!(fs::read_to_string(&path).unwrap(), text);
            assert_eq!(fs::read_dir(&sub).unwrap().count(), 1);
        }
    }

    #[test]
    fn save_refuses_a_file_changed_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), &format!("bob:{BOB_6}\n"), 0o600);
        let mut f = PasswordFile::load(&path).unwrap();
        fs::write(&path, format!("bob:{BOB_6}\nalice:{ALICE_7}\n")).unwrap();
        f.add_or_replace("carol", b"pw").unwrap();
        let e = f.save().unwrap_err();
        assert!(matches!(e, PasswordError::Changed { .. }), "{e}");
        let e = f.upgrade("bob", b"secret2").unwrap_err();
        assert!(e.to_string().contains("changed on disk"), "{e}");
        // The other writer's change survives.
        assert!(fs::read_to_string(&path).unwrap().contains("alice:"));
    }

    #[test]
    fn edit_add_replace_delete_save() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new-passwd");
        let mut f = PasswordFile::open_or_create(&path, Argon2Params::default()).unwrap();
        assert!(f.is_empty() && !f.exists_on_disk());
        assert_eq!(f.add_or_replace("alice", b"one").unwrap(), Change::Added);
        assert_eq!(f.add_or_replace("bob", b"two").unwrap(), Change::Added);
        assert_eq!(
            f.add_or_replace("alice", b"three").unwrap(),
            Change::Replaced
        );
        f.save().unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let mut f = PasswordFile::load(&path).unwrap();
        assert_eq!(f.users(), vec!["alice", "bob"]);
        assert!(f.verify("alice", b"three").is_accepted());
        assert!(!f.verify("alice", b"one").is_accepted());
        f.delete("alice").unwrap();
        assert!(matches!(
            f.delete("alice"),
            Err(PasswordError::UnknownUser { .. })
        ));
        f.save().unwrap();
        let f = PasswordFile::load(&path).unwrap();
        assert_eq!(f.users(), vec!["bob"]);
        assert!(f.verify("bob", b"two").is_accepted());
        assert!(!f.verify("alice", b"three").is_accepted());
    }

    #[test]
    fn save_makes_an_insecure_file_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), &format!("bob:{BOB_6}\n"), 0o644);
        assert!(check_mode(&path).is_err());
        let mut f = PasswordFile::open_for_edit(&path, Argon2Params::default()).unwrap();
        f.save().unwrap();
        check_mode(&path).unwrap();
    }

    #[test]
    fn usernames_are_validated() {
        for bad in [
            "",
            "a:b",
            " alice",
            "alice ",
            "al\nice",
            "al\tice",
            "#alice",
            &"x".repeat(257),
        ] {
            assert!(validate_username(bad).is_err(), "{bad:?}");
        }
        for good in [
            "alice",
            "scada-hmi.line1",
            "Jürgen Müller",
            "a$b",
            &"x".repeat(256),
        ] {
            validate_username(good).unwrap();
        }
        let mut f =
            PasswordFile::open_or_create(Path::new("/nonexistent/x"), Argon2Params::default())
                .unwrap();
        assert!(matches!(
            f.add_or_replace("a:b", b"pw"),
            Err(PasswordError::InvalidUsername { .. })
        ));
        assert!(matches!(
            f.add_or_replace("alice", b""),
            Err(PasswordError::EmptyPassword)
        ));
    }

    #[test]
    fn secret_debug_hides_the_bytes() {
        let s = Secret::new(b"hunter2".to_vec());
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(s.expose(), b"hunter2");
    }

    #[test]
    fn config_defaults_unknown_keys_and_bounds() {
        let c: PasswordConfig = toml::from_str("file = \"/etc/bulwark/passwd\"").unwrap();
        assert_eq!(c, PasswordConfig::new("/etc/bulwark/passwd"));
        assert_eq!(c.argon2_params(), Argon2Params::default());
        assert_eq!(c.max_concurrent_verifications, 2);
        assert_eq!(c.max_pending_verifications, 64);
        c.validate().unwrap();
        let e = toml::from_str::<PasswordConfig>("file = \"x\"\nargon2_memory = 1").unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        assert!(toml::from_str::<PasswordConfig>("argon2_iterations = 3").is_err());
        for (text, key) in [
            ("argon2_memory_kib = 19455", "argon2_memory_kib"),
            ("argon2_memory_kib = 2000000", "argon2_memory_kib"),
            ("argon2_iterations = 1", "argon2_iterations"),
            ("argon2_parallelism = 0", "argon2_parallelism"),
            ("argon2_parallelism = 17", "argon2_parallelism"),
            (
                "max_concurrent_verifications = 0",
                "max_concurrent_verifications",
            ),
            (
                "max_pending_verifications = 1000000",
                "max_pending_verifications",
            ),
        ] {
            let c: PasswordConfig = toml::from_str(&format!("file = \"x\"\n{text}")).unwrap();
            let e = c.validate().unwrap_err();
            assert_eq!(e.key, key);
            assert!(e.to_string().starts_with(&format!("{key}: ")), "{e}");
        }
        let e = PasswordConfig::new("").validate().unwrap_err();
        assert_eq!(e.key, "file");
    }
}
