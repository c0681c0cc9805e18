//! Token list and revocation (the web console's token page). A token is named by the first
//! [`TOKEN_ID_LEN`] hex digits of the SHA-256 of its secret: enough to tell tokens apart, and
//! nothing that helps to guess the secret. Revoking makes the token expire now (the store
//! keeps the earlier of two expiry times), so enrollment and pairing refuse it at once.

use failback_api::TokenKind;

use super::{ApiFailure, Service, R};
use crate::store::{Batch, TokenRecord};
use crate::util::now_secs;

/// Hex digits of the secret's hash that name a token.
pub const TOKEN_ID_LEN: usize = 12;

/// A token as the console lists it (never the secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenView {
    pub id: String,
    pub kind: TokenKind,
    pub instance_id: Option<String>,
    pub created_at: u64,
    pub expires_at: u64,
    pub used_at: Option<u64>,
}

impl TokenView {
    fn of(t: &TokenRecord) -> TokenView {
        TokenView {
            id: t.hash.chars().take(TOKEN_ID_LEN).collect(),
            kind: t.kind,
            instance_id: t.instance_id.clone(),
            created_at: t.created_at,
            expires_at: t.expires_at,
            used_at: t.used_at,
        }
    }

    /// `used`, `expired` or `valid` at `now`.
    pub fn status(&self, now: u64) -> &'static str {
        if self.used_at.is_some() {
            "used"
        } else if self.expires_at <= now {
            "expired"
        } else {
            "valid"
        }
    }
}

fn valid_token_id(id: &str) -> bool {
    id.len() == TOKEN_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Service {
    /// Every token, newest first.
    pub fn tokens(&self) -> R<Vec<TokenView>> {
        Ok(self.store.tokens()?.iter().map(TokenView::of).collect())
    }

    /// Makes an unused token expire now; `Conflict` when it is already used or expired.
    pub fn revoke_token(&self, actor: &str, id: &str) -> R<TokenView> {
        if !valid_token_id(id) {
            return Err(ApiFailure::bad(
                "id",
                format!("token id {id:?} is not {TOKEN_ID_LEN} lower-case hex digits"),
            ));
        }
        self.retry(|| self.revoke_token_once(actor, id))
    }

    fn revoke_token_once(&self, actor: &str, id: &str) -> R<TokenView> {
        let now = now_secs();
        let mut found: Vec<TokenRecord> = self
            .store
            .tokens()?
            .into_iter()
            .filter(|t| t.hash.starts_with(id))
            .collect();
        let mut t = match found.len() {
            0 => return Err(ApiFailure::NotFound(format!("token {id} not found"))),
            1 => found.remove(0),
            n => {
                return Err(ApiFailure::Conflict {
                    code: "TOKEN_AMBIGUOUS",
                    message: format!("{n} tokens start with {id}"),
                })
            }
        };
        let view = TokenView::of(&t);
        if view.status(now) != "valid" {
            return Err(ApiFailure::Conflict {
                code: "TOKEN_NOT_VALID",
                message: format!("token {id} is already {}", view.status(now)),
            });
        }
        t.expires_at = now;
        let mut b = Batch::by(actor);
        b.revoked_tokens.push((t.hash.clone(), now));
        b.event(
            now,
            t.instance_id.as_deref(),
            "TOKEN_REVOKED",
            format!("{} token {id}", t.kind),
        );
        self.store.apply(b)?;
        Ok(TokenView::of(&t))
    }
}
