//! Scoped admin credentials: a bearer secret with a [`Role`], created, listed and revoked by
//! an admin. The service stores only the SHA-256 of the secret (like every other token) and
//! looks the credential up on every request, so a revocation refuses the very next request.
//! The data-dir `admin-token` stays as the bootstrap credential with role `admin`.

use failback_api::{
    valid_credential_id, valid_credential_name, CreateCredentialRequest, CreateCredentialResponse,
    Credential, CredentialList, Role, CREDENTIAL_NAME_MAX,
};

use super::{ApiFailure, Service, R};
use crate::store::{Batch, CredentialRecord};
use crate::util::{now_secs, random_hex, secret_hash};

/// Actor of the data-dir `admin-token` (the bootstrap credential, role admin).
pub const BOOTSTRAP_ADMIN: &str = "bootstrap-admin";

/// Who is calling the admin API: its role and how events name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub role: Role,
    /// Recorded as the `actor` of the events the request causes.
    pub actor: String,
    /// How error messages name the caller.
    who: String,
}

impl Caller {
    /// The holder of the data-dir `admin-token`.
    pub fn bootstrap() -> Caller {
        Caller {
            role: Role::Admin,
            actor: BOOTSTRAP_ADMIN.into(),
            who: "the bootstrap admin token".into(),
        }
    }

    fn credential(c: &CredentialRecord) -> Caller {
        Caller {
            role: c.role,
            actor: format!("credential:{}:{}", c.id, c.name),
            who: format!("credential '{}' ({})", c.name, c.id),
        }
    }

    /// `Forbidden` (403) naming the role needed unless this caller's role includes `need`.
    pub fn require(&self, need: Role) -> R<()> {
        if self.role >= need {
            return Ok(());
        }
        Err(ApiFailure::Forbidden(format!(
            "{} has role {}; this needs {need}",
            self.who, self.role
        )))
    }
}

fn not_found(id: &str) -> ApiFailure {
    ApiFailure::NotFound(format!("credential {id} not found"))
}

impl Service {
    /// The caller holding the credential whose secret hashes to `hash`; unknown and revoked
    /// credentials are `Unauthorized` (401).
    pub fn credential_caller(&self, hash: &str) -> R<Caller> {
        match self.store.credential_by_secret(hash)? {
            None => Err(ApiFailure::Unauthorized(
                "admin token or credential not recognised".into(),
            )),
            Some(c) => match c.revoked_at {
                Some(at) => Err(ApiFailure::Unauthorized(format!(
                    "credential '{}' ({}) was revoked at {at}",
                    c.name, c.id
                ))),
                None => Ok(Caller::credential(&c)),
            },
        }
    }

    /// Creates a credential; its secret is in the answer and nowhere else.
    pub fn create_credential(
        &self,
        actor: &str,
        req: CreateCredentialRequest,
    ) -> R<CreateCredentialResponse> {
        self.retry(|| self.create_credential_once(actor, req.clone()))
    }

    fn create_credential_once(
        &self,
        actor: &str,
        req: CreateCredentialRequest,
    ) -> R<CreateCredentialResponse> {
        if !valid_credential_name(&req.name) {
            return Err(ApiFailure::bad(
                "name",
                format!(
                    "field name: {:?} is not 1..={CREDENTIAL_NAME_MAX} of A-Z a-z 0-9 . _ - @ \
                     starting with a letter or digit",
                    req.name
                ),
            ));
        }
        let now = now_secs();
        let all = self.store.credentials()?;
        if let Some(c) = all
            .iter()
            .find(|c| c.name == req.name && c.revoked_at.is_none())
        {
            return Err(ApiFailure::Conflict {
                code: "CREDENTIAL_NAME_TAKEN",
                message: format!(
                    "credential name '{}' is already used by {} (revoke it first)",
                    req.name, c.id
                ),
            });
        }
        let secret = format!("fbcr_{}", random_hex(32));
        let rec = CredentialRecord {
            id: format!("cred-{}", random_hex(8)),
            name: req.name,
            role: req.role,
            secret_hash: secret_hash(&secret),
            created_at: now,
            created_by: actor.to_string(),
            revoked_at: None,
            revoked_by: None,
        };
        let mut b = Batch::by(actor);
        b.event(
            now,
            None,
            "CREDENTIAL_CREATED",
            format!("credential {} '{}' role {}", rec.id, rec.name, rec.role),
        );
        b.credentials.push(rec.clone());
        self.store.apply(b)?;
        Ok(CreateCredentialResponse {
            credential: rec.public(),
            secret,
        })
    }

    pub fn credentials(&self) -> R<CredentialList> {
        Ok(CredentialList {
            items: self
                .store
                .credentials()?
                .iter()
                .map(CredentialRecord::public)
                .collect(),
        })
    }

    /// Revokes a credential: its next request is refused (401).
    pub fn revoke_credential(&self, actor: &str, id: &str) -> R<Credential> {
        if !valid_credential_id(id) {
            return Err(ApiFailure::bad(
                "id",
                format!("credential id {id:?} is not cred- followed by 16 lower-case hex digits"),
            ));
        }
        let now = now_secs();
        let mut rec = self.store.credential(id)?.ok_or_else(|| not_found(id))?;
        if let Some(at) = rec.revoked_at {
            return Err(ApiFailure::Conflict {
                code: "CREDENTIAL_REVOKED",
                message: format!("credential {id} '{}' was already revoked at {at}", rec.name),
            });
        }
        rec.revoked_at = Some(now);
        rec.revoked_by = Some(actor.to_string());
        let mut b = Batch::by(actor);
        b.event(
            now,
            None,
            "CREDENTIAL_REVOKED",
            format!("credential {id} '{}' role {}", rec.name, rec.role),
        );
        b.credentials.push(rec.clone());
        self.store.apply(b)?;
        Ok(rec.public())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_nested_and_refusal_names_the_role_needed() {
        let c = Caller {
            role: Role::Viewer,
            actor: "credential:cred-0123456789abcdef:ci-bot".into(),
            who: "credential 'ci-bot' (cred-0123456789abcdef)".into(),
        };
        assert!(c.require(Role::Viewer).is_ok());
        let e = c.require(Role::Operator).unwrap_err().to_string();
        assert!(
            e.contains("'ci-bot'") && e.contains("has role viewer; this needs operator"),
            "{e}"
        );
        let a = Caller::bootstrap();
        for r in Role::ALL {
            assert!(a.require(r).is_ok());
        }
    }
}
