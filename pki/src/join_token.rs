//! Join tokens, Swarm's design: `SKIFF-1-<CA digest>-<secret>`.
//!
//! The digest (hex SHA-256 of the CA certificate) lets a newcomer check
//! the first server it reaches without trusting it first; the secret
//! proves to that server that the newcomer may join in the token's role.

use std::fmt;

const PREFIX: &str = "SKIFF-1-";

#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub ca_digest: String,
    pub secret: String,
}

impl JoinToken {
    pub fn parse(text: &str) -> Result<JoinToken, String> {
        let fix =
            "copy the whole token printed by `skiff cluster token agent` (or `server`) on a server";
        let rest = text
            .trim()
            .strip_prefix(PREFIX)
            .ok_or_else(|| format!("invalid join token: it does not start with {PREFIX}; {fix}"))?;
        let (digest, secret) = rest
            .split_once('-')
            .ok_or_else(|| format!("invalid join token: no secret after the CA digest; {fix}"))?;
        let hex = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        };
        if digest.len() != 64 || !hex(digest) {
            return Err(format!(
                "invalid join token: the CA digest is not 64 lowercase hex digits; {fix}"
            ));
        }
        if secret.len() != 32 || !hex(secret) {
            return Err(format!(
                "invalid join token: the secret is not 32 lowercase hex digits; {fix}"
            ));
        }
        Ok(JoinToken {
            ca_digest: digest.to_string(),
            secret: secret.to_string(),
        })
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}-{}", self.ca_digest, self.secret)
    }
}

impl fmt::Debug for JoinToken {
    /// Never prints the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinToken({PREFIX}{}-…)", self.ca_digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_and_bad_ones_say_what_is_wrong() {
        let token = JoinToken {
            ca_digest: "ab".repeat(32),
            secret: "cd".repeat(16),
        };
        assert_eq!(JoinToken::parse(&token.to_string()).unwrap(), token);
        assert!(!format!("{token:?}").contains(&token.secret));
        assert!(JoinToken::parse("SWMTKN-1-x")
            .unwrap_err()
            .contains("SKIFF-1-"));
        assert!(JoinToken::parse(&format!("SKIFF-1-{}", "ab".repeat(32)))
            .unwrap_err()
            .contains("no secret"));
        assert!(
            JoinToken::parse(&format!("SKIFF-1-{}-{}", "ab".repeat(31), "cd".repeat(16)))
                .unwrap_err()
                .contains("CA digest")
        );
        assert!(
            JoinToken::parse(&format!("SKIFF-1-{}-{}", "ab".repeat(32), "cd"))
                .unwrap_err()
                .contains("secret")
        );
    }
}
