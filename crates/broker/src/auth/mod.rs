//! Authentication of clients.
//!
//! - [`passwords`]: the password file (argon2id, with Mosquitto `$7$`/`$6$` entries accepted
//!   and upgraded at login) and the bounded async [`passwords::Verifier`].

pub mod passwords;
