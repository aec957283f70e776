//! Who may use the console and whether a form came from our own page.
//!
//! Owns: the per-process HMAC key, session ids, CSRF tokens, the login
//! cookie and the `web_token` check. Every comparison of a presented secret
//! goes through `ring::hmac::verify` (constant time). Must not: store or log
//! the token, or keep per-session state (everything is derived from the key,
//! so memory does not grow with visitors; a restart logs everyone out).

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// Cookie holding the session id that CSRF tokens are derived from.
pub const SESSION_COOKIE: &str = "scriptorium_session";
/// Cookie set by the login form when `web_token` is configured.
pub const LOGIN_COOKIE: &str = "scriptorium_login";

/// A session id is 16 random bytes, hex.
const SESSION_BYTES: usize = 16;

#[derive(Debug, thiserror::Error)]
#[error("the system random number generator failed")]
pub struct RandomFailed;

pub struct Auth {
    key: hmac::Key,
    /// MAC of the configured token under `key`: the token itself is not kept.
    token_mac: Option<hmac::Tag>,
    rng: SystemRandom,
}

impl Auth {
    pub fn new(token: Option<&str>) -> Result<Auth, RandomFailed> {
        let rng = SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng).map_err(|_| RandomFailed)?;
        let token_mac = token.map(|t| hmac::sign(&key, &tagged(b"token", t.as_bytes())));
        Ok(Auth { key, token_mac, rng })
    }

    pub fn requires_login(&self) -> bool {
        self.token_mac.is_some()
    }

    /// Does `presented` equal the configured token? Compares MACs of both,
    /// in constant time, so timing tells nothing about the token.
    pub fn token_ok(&self, presented: &str) -> bool {
        match &self.token_mac {
            Some(expected) => {
                hmac::verify(&self.key, &tagged(b"token", presented.trim().as_bytes()), expected.as_ref()).is_ok()
            }
            None => true,
        }
    }

    /// The value of the login cookie (valid until the daemon restarts).
    pub fn login_cookie(&self) -> String {
        hex(hmac::sign(&self.key, b"login").as_ref())
    }

    pub fn login_cookie_ok(&self, value: &str) -> bool {
        unhex(value).is_some_and(|mac| hmac::verify(&self.key, b"login", &mac).is_ok())
    }

    pub fn new_session(&self) -> Result<String, RandomFailed> {
        let mut bytes = [0u8; SESSION_BYTES];
        self.rng.fill(&mut bytes).map_err(|_| RandomFailed)?;
        Ok(hex(&bytes))
    }

    /// A well-formed session id (so a forged cookie cannot smuggle text
    /// into a `Set-Cookie` or the MAC input).
    pub fn session_valid(session: &str) -> bool {
        session.len() == SESSION_BYTES * 2 && session.bytes().all(|b| b.is_ascii_hexdigit())
    }

    /// The CSRF token of a session: forms carry it, POSTs must echo it.
    pub fn csrf_token(&self, session: &str) -> String {
        hex(hmac::sign(&self.key, &tagged(b"csrf", session.as_bytes())).as_ref())
    }

    pub fn csrf_ok(&self, session: &str, presented: &str) -> bool {
        Auth::session_valid(session)
            && unhex(presented)
                .is_some_and(|mac| hmac::verify(&self.key, &tagged(b"csrf", session.as_bytes()), &mac).is_ok())
    }
}

/// Domain-separates the MAC inputs (a CSRF token is never a login cookie).
fn tagged(tag: &[u8], value: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(tag.len() + 1 + value.len());
    v.extend_from_slice(tag);
    v.push(0);
    v.extend_from_slice(value);
    v
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || s.len() > 128 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Finds a cookie's value in a `Cookie` header.
pub fn cookie<'a>(header: Option<&'a str>, name: &str) -> Option<&'a str> {
    header?.split(';').filter_map(|kv| kv.trim().split_once('=')).find(|(k, _)| *k == name).map(|(_, v)| v.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csrf_tokens_belong_to_their_session() {
        let auth = Auth::new(None).unwrap();
        let (a, b) = (auth.new_session().unwrap(), auth.new_session().unwrap());
        assert!(Auth::session_valid(&a) && a != b);
        assert!(auth.csrf_ok(&a, &auth.csrf_token(&a)));
        assert!(!auth.csrf_ok(&b, &auth.csrf_token(&a)));
        assert!(!auth.csrf_ok(&a, ""));
        assert!(!auth.csrf_ok(&a, "zz"));
        // Another process (another key) does not accept our tokens.
        let other = Auth::new(None).unwrap();
        assert!(!other.csrf_ok(&a, &auth.csrf_token(&a)));
    }

    #[test]
    fn token_and_login_cookie() {
        let auth = Auth::new(Some("correct horse battery staple")).unwrap();
        assert!(auth.requires_login());
        assert!(auth.token_ok("correct horse battery staple"));
        assert!(!auth.token_ok("correct horse battery stapl"));
        assert!(auth.login_cookie_ok(&auth.login_cookie()));
        assert!(!auth.login_cookie_ok(&auth.csrf_token(&auth.new_session().unwrap())));
        assert!(!Auth::new(None).unwrap().requires_login());
    }

    #[test]
    fn cookie_header_parsing() {
        let h = Some("a=1; scriptorium_session=abc ; b=2");
        assert_eq!(cookie(h, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(h, "b"), Some("2"));
        assert_eq!(cookie(h, "c"), None);
        assert_eq!(cookie(None, "a"), None);
    }
}
