//! Connection, session and the SOAP call path.

use crate::error::{Error, Fault, FaultKind, Result};
use crate::tls::{self, TlsMode};
use crate::xml::{self, escape, Element};
use reqwest::cookie::CookieStore;
use reqwest::header::HeaderValue;
use reqwest::Url;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Name of the vim25 session cookie.
pub const SESSION_COOKIE: &str = "vmware_soap_session";

/// Connection settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// SDK URL, `https://host[:port]/sdk`. A bare host or `host:port` is accepted.
    pub url: String,
    pub username: String,
    pub password: String,
    pub tls: TlsMode,
    /// Datacenter for datastore file access (`dcPath`); if unset the only one is used.
    pub datacenter: Option<String>,
    /// Time limit of one SOAP request.
    pub request_timeout: Duration,
    /// Default time limit for a task to finish.
    pub task_timeout: Duration,
}

impl Config {
    pub fn new(url: &str, username: &str, password: &str) -> Self {
        Config {
            url: url.to_string(),
            username: username.to_string(),
            password: password.to_string(),
            tls: TlsMode::Verify,
            datacenter: None,
            request_timeout: Duration::from_secs(120),
            task_timeout: Duration::from_secs(600),
        }
    }

    /// Parses a govc-style URL, `https://user:password@host[:port]/sdk` (user and password
    /// percent-decoded; either may be absent and set later).
    pub fn from_url(url: &str) -> Result<Self> {
        let u = sdk_url(url)?;
        let dec = |s: &str| {
            percent_decode(s).map_err(|e| Error::Config(format!("URL {}: {e}", redact(&u))))
        };
        let user = dec(u.username())?;
        let pass = dec(u.password().unwrap_or(""))?;
        let mut clean = u.clone();
        let _ = clean.set_username("");
        let _ = clean.set_password(None);
        Ok(Config::new(clean.as_str(), &user, &pass))
    }
}

fn percent_decode(s: &str) -> std::result::Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .ok_or_else(|| "truncated %-escape".to_string())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad %-escape %{hex}"))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "credentials are not UTF-8".to_string())
}

/// The URL without credentials, for messages.
fn redact(u: &Url) -> String {
    let mut u = u.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.to_string()
}

/// Normalises what the user gave into the SDK URL.
fn sdk_url(s: &str) -> Result<Url> {
    let with_scheme = if s.contains("://") {
        s.to_string()
    } else {
        format!("https://{s}")
    };
    let mut u =
        Url::parse(&with_scheme).map_err(|e| Error::Config(format!("vCenter URL '{s}': {e}")))?;
    if u.scheme() != "https" && u.scheme() != "http" {
        return Err(Error::Config(format!(
            "vCenter URL '{s}': scheme must be https (or http for a local test server)"
        )));
    }
    if u.host_str().is_none() {
        return Err(Error::Config(format!("vCenter URL '{s}' has no host")));
    }
    if u.path() == "/" || u.path().is_empty() {
        u.set_path("/sdk");
    }
    u.set_query(None);
    u.set_fragment(None);
    Ok(u)
}

/// A managed object reference. Moids are opaque (vcsim's datastore moids contain paths).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MoRef {
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
}

impl MoRef {
    pub fn new(kind: &str, value: &str) -> Self {
        MoRef {
            kind: kind.to_string(),
            value: value.to_string(),
        }
    }

    pub(crate) fn from_element(el: &Element) -> Option<MoRef> {
        Some(MoRef {
            kind: el.attr("type")?.to_string(),
            value: el.text.trim().to_string(),
        })
    }

    /// `<name type="T">value</name>`
    pub fn to_xml(&self, name: &str) -> String {
        format!(
            "<{name} type=\"{}\">{}</{name}>",
            escape(&self.kind),
            escape(&self.value)
        )
    }
}

impl std::fmt::Display for MoRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.value)
    }
}

/// What `RetrieveServiceContent` told us.
#[derive(Debug, Clone)]
pub struct ServiceContent {
    pub root_folder: MoRef,
    pub property_collector: MoRef,
    pub view_manager: MoRef,
    pub session_manager: MoRef,
    pub search_index: MoRef,
    pub file_manager: Option<MoRef>,
    pub about: About,
}

/// `ServiceContent.about`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct About {
    pub full_name: String,
    pub api_version: String,
    pub api_type: String,
    pub instance_uuid: Option<String>,
}

impl ServiceContent {
    fn parse(rv: &Element, url: &str) -> Result<Self> {
        let mo = |n: &str| {
            rv.child(n)
                .and_then(MoRef::from_element)
                .ok_or_else(|| Error::Protocol {
                    what: "RetrieveServiceContent".into(),
                    url: url.to_string(),
                    detail: format!("ServiceContent has no {n}"),
                })
        };
        let about = rv.child("about");
        let about_field = |n: &str| {
            about
                .and_then(|a| a.text_of(n))
                .unwrap_or_default()
                .to_string()
        };
        Ok(ServiceContent {
            root_folder: mo("rootFolder")?,
            property_collector: mo("propertyCollector")?,
            view_manager: mo("viewManager")?,
            session_manager: mo("sessionManager")?,
            search_index: mo("searchIndex")?,
            file_manager: mo("fileManager").ok(),
            about: About {
                full_name: about_field("fullName"),
                api_version: about_field("apiVersion"),
                api_type: about_field("apiType"),
                instance_uuid: about
                    .and_then(|a| a.text_of("instanceUuid"))
                    .map(str::to_string),
            },
        })
    }
}

/// Holds only the vim25 session cookie, exactly as the server sent it (real vCenter quotes
/// the value, vcsim does not; both are sent back verbatim). Why not reqwest's `Jar`: a
/// re-login must start from an empty jar (vcsim refuses Login while the old cookie is
/// valid) and `Jar` cannot be cleared.
#[derive(Debug, Default)]
struct SessionCookie {
    value: Mutex<Option<String>>,
}

impl SessionCookie {
    fn clear(&self) {
        *self.value.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
    fn get(&self) -> Option<String> {
        self.value.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Extracts the session cookie value from one `Set-Cookie` header.
pub(crate) fn parse_session_cookie(set_cookie: &str) -> Option<String> {
    let first = set_cookie.split(';').next()?;
    let (k, v) = first.split_once('=')?;
    (k.trim() == SESSION_COOKIE).then(|| v.trim().to_string())
}

impl CookieStore for SessionCookie {
    fn set_cookies(&self, cookie_headers: &mut dyn Iterator<Item = &HeaderValue>, _url: &Url) {
        for h in cookie_headers {
            if let Some(v) = h.to_str().ok().and_then(parse_session_cookie) {
                *self.value.lock().unwrap_or_else(|e| e.into_inner()) = Some(v);
            }
        }
    }

    fn cookies(&self, _url: &Url) -> Option<HeaderValue> {
        let v = self.get()?;
        HeaderValue::from_str(&format!("{SESSION_COOKIE}={v}")).ok()
    }
}

/// A logged-in vSphere client. Cheap to clone; safe to use from many tasks at once (one
/// session, shared; a session that expires is renewed once, by one task).
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.inner.sdk.as_str())
            .field("user", &self.inner.cfg.username)
            .finish()
    }
}

pub(crate) struct Inner {
    pub(crate) http: reqwest::Client,
    pub(crate) sdk: Url,
    pub(crate) cfg: Config,
    pub(crate) sc: ServiceContent,
    cookie: Arc<SessionCookie>,
    login_lock: tokio::sync::Mutex<()>,
    generation: AtomicU64,
    logins: AtomicU64,
    /// Set by `logout`: no silent re-login afterwards.
    logged_out: std::sync::atomic::AtomicBool,
}

const ENVELOPE_START: &str = concat!(
    r#"<?xml version="1.0" encoding="UTF-8"?>"#,
    r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" "#,
    r#"xmlns:xsd="http://www.w3.org/2001/XMLSchema" "#,
    r#"xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>"#
);
const ENVELOPE_END: &str = "</soapenv:Body></soapenv:Envelope>";

/// `<Method xmlns="urn:vim25"><_this type="T">id</_this>{args}</Method>`
pub(crate) fn request(method: &str, this: &MoRef, args: &str) -> String {
    format!(
        "<{method} xmlns=\"urn:vim25\">{}{args}</{method}>",
        this.to_xml("_this")
    )
}

struct Transport<'a> {
    http: &'a reqwest::Client,
    sdk: &'a Url,
    timeout: Duration,
}

impl Transport<'_> {
    /// One SOAP round trip. Returns the response element (`XxxResponse`).
    async fn soap(&self, what: &str, body: &str) -> Result<Element> {
        let url = self.sdk.as_str();
        let envelope = format!("{ENVELOPE_START}{body}{ENVELOPE_END}");
        let resp = self
            .http
            .post(self.sdk.clone())
            .header("Content-Type", "text/xml; charset=utf-8")
            .header("SOAPAction", "\"urn:vim25/6.5\"")
            .timeout(self.timeout)
            .body(envelope)
            .send()
            .await
            .map_err(|source| Error::Http {
                what: what.to_string(),
                url: url.to_string(),
                source,
            })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|source| Error::Http {
            what: what.to_string(),
            url: url.to_string(),
            source,
        })?;
        let proto = |detail: String| Error::Protocol {
            what: what.to_string(),
            url: url.to_string(),
            detail,
        };
        let doc = match xml::parse(&text) {
            Ok(d) => d,
            Err(e) if status.is_success() => return Err(proto(format!("invalid XML: {e}"))),
            Err(_) => {
                return Err(Error::HttpStatus {
                    what: what.to_string(),
                    url: url.to_string(),
                    status: status.as_u16(),
                    body: snippet(&text),
                })
            }
        };
        let body_el = doc
            .child("Body")
            .ok_or_else(|| proto("no SOAP Body".into()))?;
        let first = body_el
            .children
            .first()
            .ok_or_else(|| proto("empty SOAP Body".into()))?;
        if first.name == "Fault" {
            return Err(Error::Fault {
                what: what.to_string(),
                fault: Box::new(decode_soap_fault(first)),
            });
        }
        if !status.is_success() {
            return Err(Error::HttpStatus {
                what: what.to_string(),
                url: url.to_string(),
                status: status.as_u16(),
                body: snippet(&text),
            });
        }
        // RetrievePropertiesEx reports an expired session as HTTP 200 with a missingSet fault.
        if let Some(rv) = first.child("returnval") {
            for obj in rv.children_named("objects") {
                for ms in obj.children_named("missingSet") {
                    if let Some(f) = ms.child("fault") {
                        let fault = decode_method_fault(f);
                        if fault.kind == FaultKind::NotAuthenticated {
                            return Err(Error::Fault {
                                what: what.to_string(),
                                fault: Box::new(fault),
                            });
                        }
                    }
                }
            }
        }
        Ok(first.clone())
    }
}

fn snippet(s: &str) -> String {
    let t: String = s.chars().take(300).collect();
    t.replace('\n', " ")
}

/// Decodes `<soapenv:Fault><faultstring/><detail><XFault xsi:type="X">`.
pub(crate) fn decode_soap_fault(f: &Element) -> Fault {
    let message = f.text_of("faultstring").unwrap_or_default().to_string();
    let detail = f.child("detail").and_then(|d| d.children.first());
    let type_name = detail
        .map(|d| {
            d.xsi_type
                .clone()
                .unwrap_or_else(|| d.name.trim_end_matches("Fault").to_string())
        })
        .unwrap_or_else(|| "SoapFault".to_string());
    Fault {
        kind: FaultKind::from_element(&type_name, detail),
        message,
    }
}

/// Decodes a `LocalizedMethodFault` (`<fault xsi:type="X">..</fault><localizedMessage>`),
/// given either the LocalizedMethodFault or its inner `fault` element.
pub(crate) fn decode_method_fault(el: &Element) -> Fault {
    let (inner, message) = match el.child("fault") {
        Some(f) => (f, el.text_of("localizedMessage").unwrap_or_default()),
        None => (el, ""),
    };
    let type_name = inner.xsi_type.clone().unwrap_or_else(|| inner.name.clone());
    let mut message = message.to_string();
    if message.is_empty() {
        if let Some(m) = inner
            .child("faultMessage")
            .and_then(|m| m.text_of("message"))
        {
            message = m.to_string();
        }
    }
    Fault {
        kind: FaultKind::from_element(&type_name, Some(inner)),
        message,
    }
}

impl Client {
    /// Connects, reads the service content and logs in.
    pub async fn connect(cfg: Config) -> Result<Client> {
        let sdk = sdk_url(&cfg.url)?;
        let cookie = Arc::new(SessionCookie::default());
        let builder = reqwest::Client::builder()
            .cookie_provider(cookie.clone())
            .connect_timeout(Duration::from_secs(30))
            .user_agent(concat!("failback-vcenter/", env!("CARGO_PKG_VERSION")));
        let http = tls::configure(builder, &cfg.tls)?
            .build()
            .map_err(|source| Error::Http {
                what: "build HTTP client".into(),
                url: sdk.to_string(),
                source,
            })?;
        let t = Transport {
            http: &http,
            sdk: &sdk,
            timeout: cfg.request_timeout,
        };
        let si = MoRef::new("ServiceInstance", "ServiceInstance");
        let resp = t
            .soap(
                "RetrieveServiceContent",
                &request("RetrieveServiceContent", &si, ""),
            )
            .await?;
        let rv = resp.child("returnval").ok_or_else(|| Error::Protocol {
            what: "RetrieveServiceContent".into(),
            url: sdk.to_string(),
            detail: "no returnval".into(),
        })?;
        let sc = ServiceContent::parse(rv, sdk.as_str())?;
        let client = Client {
            inner: Arc::new(Inner {
                http,
                sdk,
                cfg,
                sc,
                cookie,
                login_lock: tokio::sync::Mutex::new(()),
                generation: AtomicU64::new(0),
                logins: AtomicU64::new(0),
                logged_out: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        client.login().await?;
        Ok(client)
    }

    fn transport(&self) -> Transport<'_> {
        Transport {
            http: &self.inner.http,
            sdk: &self.inner.sdk,
            timeout: self.inner.cfg.request_timeout,
        }
    }

    /// The SDK URL (without credentials).
    pub fn url(&self) -> &str {
        self.inner.sdk.as_str()
    }

    pub fn config(&self) -> &Config {
        &self.inner.cfg
    }

    pub fn service_content(&self) -> &ServiceContent {
        &self.inner.sc
    }

    pub fn about(&self) -> &About {
        &self.inner.sc.about
    }

    /// How many logins this client made (1 + re-logins after an expired session).
    pub fn login_count(&self) -> u64 {
        self.inner.logins.load(Ordering::SeqCst)
    }

    /// The current session cookie value as the server sent it (quoted or not).
    pub fn session_cookie(&self) -> Option<String> {
        self.inner.cookie.get()
    }

    async fn login(&self) -> Result<()> {
        let cfg = &self.inner.cfg;
        self.inner.cookie.clear();
        let body = request(
            "Login",
            &self.inner.sc.session_manager,
            &format!(
                "<userName>{}</userName><password>{}</password>",
                escape(&cfg.username),
                escape(&cfg.password)
            ),
        );
        match self.transport().soap("Login", &body).await {
            Ok(_) => {
                self.inner.logins.fetch_add(1, Ordering::SeqCst);
                tracing::debug!(url = %self.url(), user = %cfg.username, "logged in");
                Ok(())
            }
            Err(Error::Fault { fault, .. }) if fault.kind == FaultKind::InvalidLogin => {
                Err(Error::InvalidLogin {
                    url: self.url().to_string(),
                    user: cfg.username.clone(),
                    fault,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Ends the session on the server.
    pub async fn logout(&self) -> Result<()> {
        let body = request("Logout", &self.inner.sc.session_manager, "");
        self.transport().soap("Logout", &body).await?;
        self.inner.logged_out.store(true, Ordering::SeqCst);
        self.inner.cookie.clear();
        Ok(())
    }

    /// Logs in again unless another task already did since `seen_generation`.
    async fn relogin(&self, seen_generation: u64) -> Result<()> {
        let _guard = self.inner.login_lock.lock().await;
        if self.inner.generation.load(Ordering::SeqCst) != seen_generation {
            return Ok(());
        }
        tracing::info!(url = %self.url(), "vCenter session expired; logging in again");
        self.login().await?;
        self.inner.generation.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// A SOAP call with the session: on `NotAuthenticated`, log in again once and retry;
    /// a second `NotAuthenticated` is `Error::SessionExpired`.
    pub(crate) async fn call(&self, what: &str, body: &str) -> Result<Element> {
        let generation = self.inner.generation.load(Ordering::SeqCst);
        match self.transport().soap(what, body).await {
            Err(e) if e.is_not_authenticated() && !self.inner.logged_out.load(Ordering::SeqCst) => {
                self.relogin(generation).await?;
                match self.transport().soap(what, body).await {
                    Err(Error::Fault { fault, .. })
                        if fault.kind == FaultKind::NotAuthenticated =>
                    {
                        Err(Error::SessionExpired {
                            what: what.to_string(),
                            url: self.url().to_string(),
                            fault,
                        })
                    }
                    r => r,
                }
            }
            r => r,
        }
    }

    /// Checks the session (renewing it if expired), e.g. before a long upload.
    pub async fn ensure_session(&self) -> Result<()> {
        self.retrieve_one(
            "check session",
            &self.inner.sc.session_manager.clone(),
            &["currentSession"],
        )
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_quoted_and_unquoted() {
        assert_eq!(
            parse_session_cookie("vmware_soap_session=abc-1; Path=/; HttpOnly").as_deref(),
            Some("abc-1")
        );
        assert_eq!(
            parse_session_cookie("vmware_soap_session=\"52a0\"; Path=/; HttpOnly; Secure")
                .as_deref(),
            Some("\"52a0\"")
        );
        assert_eq!(parse_session_cookie("other=1"), None);
    }

    #[test]
    fn urls() {
        assert_eq!(
            sdk_url("vc.example").unwrap().as_str(),
            "https://vc.example/sdk"
        );
        assert_eq!(
            sdk_url("https://vc:8443").unwrap().as_str(),
            "https://vc:8443/sdk"
        );
        assert!(sdk_url("ftp://x/sdk").is_err());
        let c = Config::from_url("https://adm%40vsphere.local:p%3Ass@vc:443/sdk").unwrap();
        assert_eq!(c.username, "adm@vsphere.local");
        assert_eq!(c.password, "p:ss");
        assert_eq!(c.url, "https://vc/sdk");
    }

    #[test]
    fn faults_decode() {
        let doc = r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>no such vm</faultstring><detail><ManagedObjectNotFoundFault xmlns="urn:vim25" xsi:type="ManagedObjectNotFound"><obj type="VirtualMachine">vm-9</obj></ManagedObjectNotFoundFault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>"#;
        let d = xml::parse(doc).unwrap();
        let f = decode_soap_fault(&d.children[0].children[0]);
        assert_eq!(
            f.kind,
            FaultKind::ManagedObjectNotFound {
                obj: Some("vm-9".into())
            }
        );
        assert_eq!(f.message, "no such vm");
    }
}
