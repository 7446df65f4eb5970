//! Passwords: a policy, and argon2id hashing.
//!
//! Policy: at least 10 characters, at most 256 (and 1,024 bytes, checked
//! first, so a huge input costs nothing), and not one of the 20,000 most
//! common passwords (`data/common-passwords.txt`, compared case-insensitively).
//!
//! Hashing: argon2id, version 19, m = 19,456 KiB, t = 2, p = 1 (the OWASP
//! recommendation), a random 16-byte salt, stored as a PHC string. Hashing
//! takes tens of milliseconds of CPU and 19 MiB, so it runs on a few threads
//! of its own, at most [`Hashing`]'s bound at once.

use std::collections::HashSet;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use std::cell::RefCell;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{self, Output, ParamsString, PasswordHash, Salt, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use plinth_http::FieldError;

use crate::error::IdentityError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub const MIN_CHARS: usize = 10;
pub const MAX_CHARS: usize = 256;
const MAX_BYTES: usize = 1024;

static COMMON: LazyLock<HashSet<&'static str>> =
    LazyLock::new(|| include_str!("../data/common-passwords.txt").lines().map(str::trim).collect());

/// Why a password is refused, as a field error for `field`.
pub fn check(field: &str, password: &str) -> Result<(), FieldError> {
    if password.len() > MAX_BYTES || password.chars().count() > MAX_CHARS {
        return Err(FieldError::new(field, "too_long", format!("must be at most {MAX_CHARS} characters")));
    }
    if password.chars().count() < MIN_CHARS {
        return Err(FieldError::new(field, "too_short", format!("must be at least {MIN_CHARS} characters")));
    }
    if COMMON.contains(password.to_lowercase().as_str()) {
        return Err(FieldError::new(field, "too_common", "is one of the most common passwords; choose another"));
    }
    Ok(())
}

/// Argon2id runs at once, and how long a caller waits for a turn.
///
/// Each run holds 19 MiB for tens of milliseconds; without a bound, a burst
/// of logins multiplies that (120 concurrent logins once took an instance to
/// 2.2 GB). Callers beyond `permits` wait up to `wait` for a turn, then get
/// 503 `unavailable` with `Retry-After`.
/// Registered as app data; cheap to clone.
#[derive(Clone)]
pub struct Hashing {
    permits: Arc<Semaphore>,
    wait: Duration,
    work: std::sync::mpsc::SyncSender<Job>,
}

type Job = Box<dyn FnOnce() + Send>;

impl Hashing {
    /// `PLINTH_HASH_CONCURRENCY` (default: the number of cores) and
    /// `PLINTH_HASH_WAIT_MS` (default 2000).
    ///
    /// Hashes run on `concurrency` threads of their own rather than on the
    /// shared blocking pool: the allocator keeps a freed 19 MiB block in the
    /// arena of the thread that used it, so hashes spread over the blocking
    /// pool's many threads grow the process by 19 MiB per thread ever used
    /// (seen: 711 MiB after a burst with two permits). On a fixed few
    /// threads, memory stays at `concurrency` × 19 MiB.
    pub fn new(concurrency: usize, wait: Duration) -> Self {
        let concurrency = concurrency.max(1);
        // One slot per permit, and one for the warm-up below.
        let (work, jobs) = std::sync::mpsc::sync_channel::<Job>(concurrency + 1);
        let jobs = Arc::new(std::sync::Mutex::new(jobs));
        for i in 0..concurrency {
            let jobs = Arc::clone(&jobs);
            let spawned = std::thread::Builder::new().name(format!("plinth-hash-{i}")).spawn(move || {
                loop {
                    // The lock is held only while taking a job, not running it.
                    let job = jobs.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return, // every `Hashing` is gone
                    }
                }
            });
            if let Err(err) = spawned {
                tracing::error!(error = %err, "could not start a password hashing thread");
            }
        }
        // The dummy hash is made now, not by the first failed login (which
        // would then take twice as long as the others).
        let _ = work.try_send(Box::new(|| {
            LazyLock::force(&DUMMY);
        }));
        Self { permits: Arc::new(Semaphore::new(concurrency)), wait, work }
    }

    /// Runs `f` on a hashing thread once a turn is free (503 after `wait`).
    async fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Result<R, IdentityError> {
        let permit = match tokio::time::timeout(self.wait, Arc::clone(&self.permits).acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(closed)) => {
                return Err(IdentityError::Internal(anyhow::Error::new(closed).context("the hasher is closed")));
            }
            Err(_) => {
                tracing::warn!(wait_ms = self.wait.as_millis() as u64, "password hashing is saturated; refusing");
                return Err(IdentityError::HashingBusy);
            }
        };
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _permit: OwnedSemaphorePermit = permit;
            let _ = done.send(f());
        });
        // Never blocks: a job is sent only with a permit, and there are as
        // many channel slots as permits.
        self.work
            .try_send(job)
            .map_err(|_| IdentityError::Internal(anyhow::anyhow!("the password hashing threads are gone")))?;
        result
            .await
            .map_err(|e| IdentityError::Internal(anyhow::Error::new(e).context("password hashing was cancelled")))
    }

    /// Hashes a password that passed [`check`].
    pub async fn hash(&self, password: String) -> Result<String, IdentityError> {
        self.run(move || hash_with_own_memory(password.as_bytes()))
            .await?
            .map_err(|e| IdentityError::Internal(anyhow::anyhow!("{e}").context("hashing a password")))
    }

    /// Whether `password` matches `stored`. With `None` (no such account, a
    /// malformed address, an over-long password) it runs the same argon2id
    /// verification against a dummy hash and says no, so every failed login
    /// costs the same.
    pub async fn verify(&self, password: &str, stored: Option<String>) -> Result<bool, IdentityError> {
        // An over-long password is verified as an empty one: the same work,
        // and a huge input costs nothing extra.
        let password = if password.len() > MAX_BYTES { String::new() } else { password.to_owned() };
        self.run(move || {
            let known = stored.is_some();
            let Some(stored) = stored.or_else(|| DUMMY.clone()) else { return false };
            let matches = verify_with_own_memory(password.as_bytes(), &stored).unwrap_or(false);
            known && matches
        })
        .await
    }
}

impl Default for Hashing {
    fn default() -> Self {
        Self::new(std::thread::available_parallelism().map_or(2, |n| n.get()), Duration::from_secs(2))
    }
}

/// A valid hash of a password nobody has, verified against when the account
/// does not exist, so a login takes as long either way.
static DUMMY: LazyLock<Option<String>> = LazyLock::new(|| hash_with_own_memory(b"no account has this password").ok());

thread_local! {
    /// argon2's working memory, allocated once per hashing thread and reused
    /// by every hash it runs (argon2's own `hash_password` allocates and
    /// frees 19 MiB per call, which the allocator then keeps per arena).
    static BLOCKS: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

/// The raw argon2 output for `password` and `salt`, computed in this
/// thread's reusable memory.
fn raw_hash(
    argon: &Argon2<'_>,
    password: &[u8],
    salt: Salt<'_>,
    output_len: usize,
) -> Result<Output, password_hash::Error> {
    let mut salt_buf = [0u8; 64];
    let salt = salt.decode_b64(&mut salt_buf)?;
    BLOCKS.with(|blocks| {
        let mut blocks = blocks.borrow_mut();
        let count = argon.params().block_count();
        if blocks.len() < count {
            blocks.resize(count, Block::default());
        }
        Output::init_with(output_len, |out| {
            Ok(argon.hash_password_into_with_memory(password, salt, out, &mut blocks[..count])?)
        })
    })
}

/// argon2id with the default parameters and a new random salt, as a PHC
/// string: the same string `Argon2::default().hash_password` makes.
fn hash_with_own_memory(password: &[u8]) -> Result<String, password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    let argon = Argon2::default();
    let output_len = argon.params().output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN);
    let output = raw_hash(&argon, password, salt.as_salt(), output_len)?;
    let hash = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(argon.params())?,
        salt: Some(salt.as_salt()),
        hash: Some(output),
    };
    Ok(hash.to_string())
}

/// Whether `password` matches the PHC string `stored` (any argon2 variant,
/// version and parameters it names); the comparison is constant-time.
fn verify_with_own_memory(password: &[u8], stored: &str) -> Result<bool, password_hash::Error> {
    let parsed = PasswordHash::new(stored)?;
    let algorithm = Algorithm::try_from(parsed.algorithm)?;
    let version = parsed.version.map(Version::try_from).transpose()?.unwrap_or_default();
    let params = Params::try_from(&parsed)?;
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else { return Ok(false) };
    let argon = Argon2::new(algorithm, version, params);
    let computed = raw_hash(&argon, password, salt, expected.len())?;
    Ok(computed == expected)
}

/// A password nobody knows (32 random bytes), for an account made for
/// someone by their organization (SCIM, single sign-on): they set their
/// own through password reset, or keep signing in through their provider.
pub fn unknown() -> Result<String, plinth_http::ApiError> {
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| plinth_http::ApiError::Internal(anyhow::anyhow!("{e}").context("random bytes")))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_argon2s_own_phc_strings() -> Result<(), password_hash::Error> {
        use argon2::password_hash::{PasswordHasher as _, PasswordVerifier as _};
        let ours = hash_with_own_memory(b"correct horse battery staple")?;
        let parsed = PasswordHash::new(&ours)?;
        assert!(Argon2::default().verify_password(b"correct horse battery staple", &parsed).is_ok());
        assert!(ours.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        let theirs = Argon2::default().hash_password(b"another one", &SaltString::generate(&mut OsRng))?.to_string();
        assert!(verify_with_own_memory(b"another one", &theirs)?);
        assert!(!verify_with_own_memory(b"another two", &theirs)?);
        Ok(())
    }

    #[test]
    fn the_policy() {
        assert!(check("p", "correct horse battery staple").is_ok());
        assert!(check("p", "ünïcødé-😀-pass").is_ok(), "unicode counts in characters");
        assert_eq!(check("p", "short").map_err(|e| e.code), Err("too_short"));
        assert_eq!(check("p", "😀😀😀😀😀😀😀😀😀").map_err(|e| e.code), Err("too_short"));
        assert_eq!(check("p", &"x".repeat(5000)).map_err(|e| e.code), Err("too_long"));
        for common in ["password123", "qwertyuiop", "PASSWORD123", "1234567890"] {
            assert_eq!(check("p", common).map_err(|e| e.code), Err("too_common"), "{common}");
        }
        assert!(COMMON.len() > 19_000);
    }
}
