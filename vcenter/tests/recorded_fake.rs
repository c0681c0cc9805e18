//! Faults vcsim cannot produce (its tasks finish synchronously; its sessions never fail
//! twice in a row; its cookie is unquoted), replayed by `RecordedVcenter`: a hand-made
//! fake that answers each SOAP method with a response recorded from vcsim / vCenter,
//! edited to the state under test. Named as a fake on purpose: it is not a vCenter.

use failback_vcenter::{Client, Config, Error, FaultKind, MoRef, VmRef};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One request as the fake saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    cookie: Option<String>,
    body: String,
}

/// Status, extra headers, body.
type Reply = (u16, Vec<(String, String)>, String);
type Handler = dyn Fn(&Seen, usize) -> Reply + Send + Sync;

/// The fake server: plain HTTP on 127.0.0.1:0.
struct RecordedVcenter {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl RecordedVcenter {
    async fn start(handler: Arc<Handler>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/sdk", listener.local_addr().unwrap());
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let seen2 = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let handler = handler.clone();
                let seen = seen2.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut tmp = [0u8; 8192];
                    // Headers, then Content-Length bytes of body.
                    let (head_end, len) = loop {
                        let n = sock.read(&mut tmp).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&tmp[..n]);
                        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..p]).to_lowercase();
                            let len = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .map(|v| v.trim().parse::<usize>().unwrap())
                                .unwrap_or(0);
                            break (p + 4, len);
                        }
                    };
                    while buf.len() < head_end + len {
                        let n = sock.read(&mut tmp).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&tmp[..n]);
                    }
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let body = String::from_utf8_lossy(&buf[head_end..head_end + len]).to_string();
                    let cookie = head.lines().find_map(|l| {
                        l.split_once(':')
                            .filter(|(k, _)| k.eq_ignore_ascii_case("cookie"))
                            .map(|(_, v)| v.trim().to_string())
                    });
                    let method = body
                        .split("<soapenv:Body>")
                        .nth(1)
                        .and_then(|b| b.strip_prefix('<'))
                        .and_then(|b| b.split([' ', '>']).next())
                        .unwrap_or("")
                        .to_string();
                    let req = Seen {
                        method,
                        cookie,
                        body,
                    };
                    let n = {
                        let mut s = seen.lock().unwrap();
                        s.push(req.clone());
                        s.iter().filter(|r| r.method == req.method).count()
                    };
                    let (status, headers, body) = handler(&req, n);
                    let mut resp = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: text/xml; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
                        body.len()
                    );
                    for (k, v) in headers {
                        resp.push_str(&format!("{k}: {v}\r\n"));
                    }
                    resp.push_str("\r\n");
                    resp.push_str(&body);
                    let _ = sock.write_all(resp.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        RecordedVcenter { url, seen }
    }

    fn count(&self, method: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.method == method)
            .count()
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn config(&self) -> Config {
        let mut c = Config::new(&self.url, "user", "pass");
        c.task_timeout = Duration::from_secs(2);
        c
    }
}

fn envelope(inner: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>{inner}</soapenv:Body></soapenv:Envelope>"#
    )
}

/// Recorded from vcsim 0.24.2 (trimmed to what the client reads).
fn service_content() -> String {
    envelope(
        r#"<RetrieveServiceContentResponse xmlns="urn:vim25"><returnval><rootFolder type="Folder">group-d1</rootFolder><propertyCollector type="PropertyCollector">propertyCollector</propertyCollector><viewManager type="ViewManager">ViewManager</viewManager><about><name>VMware vCenter Server</name><fullName>VMware vCenter Server 6.5.0 build-5973321</fullName><apiType>VirtualCenter</apiType><apiVersion>6.5</apiVersion><instanceUuid>dbed6e0c-bd88-4ef6-b594-21283e1c677f</instanceUuid></about><sessionManager type="SessionManager">SessionManager</sessionManager><searchIndex type="SearchIndex">SearchIndex</searchIndex><fileManager type="FileManager">FileManager</fileManager></returnval></RetrieveServiceContentResponse>"#,
    )
}

fn login_ok() -> String {
    envelope(
        r#"<LoginResponse xmlns="urn:vim25"><returnval><key>52a0</key><userName>user</userName></returnval></LoginResponse>"#,
    )
}

fn fault(type_name: &str, detail: &str, msg: &str) -> String {
    envelope(&format!(
        r#"<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>{msg}</faultstring><detail><{type_name}Fault xmlns="urn:vim25" xsi:type="{type_name}">{detail}</{type_name}Fault></detail></soapenv:Fault>"#
    ))
}

fn task_returned(method: &str) -> String {
    envelope(&format!(
        r#"<{method}Response xmlns="urn:vim25"><returnval type="Task">task-7</returnval></{method}Response>"#
    ))
}

/// `RetrievePropertiesEx` of `Task.info` in a state, as vcsim writes it
/// (`XMLSchema-instance:type`, not `xsi:type`).
fn task_info(state: &str, error: &str) -> String {
    envelope(&format!(
        r#"<RetrievePropertiesExResponse xmlns="urn:vim25"><returnval><objects><obj type="Task">task-7</obj><propSet><name>info</name><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="TaskInfo"><key>task-7</key><task type="Task">task-7</task><state>{state}</state>{error}</val></propSet></objects></returnval></RetrievePropertiesExResponse>"#
    ))
}

fn vm() -> VmRef {
    VmRef {
        moref: MoRef::new("VirtualMachine", "vm-63"),
        name: "web01".into(),
    }
}

fn base(req: &Seen) -> Option<Reply> {
    match req.method.as_str() {
        "RetrieveServiceContent" => Some((200, vec![], service_content())),
        "Login" => Some((
            200,
            vec![(
                "Set-Cookie".into(),
                "vmware_soap_session=\"52a0-quoted\"; Path=/; HttpOnly; Secure".into(),
            )],
            login_ok(),
        )),
        _ => None,
    }
}

#[tokio::test]
async fn task_that_never_finishes_times_out() {
    let fake = RecordedVcenter::start(Arc::new(|req: &Seen, _n| {
        base(req).unwrap_or_else(|| match req.method.as_str() {
            "PowerOnVM_Task" => (200, vec![], task_returned("PowerOnVM_Task")),
            "RetrievePropertiesEx" => (200, vec![], task_info("running", "")),
            m => (500, vec![], fault("MethodNotFound", "", m)),
        })
    }))
    .await;
    let client = Client::connect(fake.config()).await.unwrap();
    let err = client
        .power(&vm(), failback_vcenter::PowerOp::On)
        .await
        .unwrap_err();
    match &err {
        Error::TaskTimeout {
            task,
            state,
            waited,
            ..
        } => {
            assert_eq!((task.as_str(), state.as_str()), ("task-7", "running"));
            assert!(*waited >= Duration::from_secs(2), "{waited:?}");
        }
        other => panic!("expected TaskTimeout, got {other:?}"),
    }
    assert!(err.is_transient());
    assert!(
        err.to_string().contains("web01") && err.to_string().contains("task-7"),
        "{err}"
    );
    assert!(
        fake.count("RetrievePropertiesEx") >= 2,
        "polled more than once"
    );
}

#[tokio::test]
async fn slow_task_is_waited_for() {
    let fake = RecordedVcenter::start(Arc::new(|req: &Seen, n| {
        base(req).unwrap_or_else(|| match req.method.as_str() {
            "PowerOffVM_Task" => (200, vec![], task_returned("PowerOffVM_Task")),
            "RetrievePropertiesEx" if n == 1 => (200, vec![], task_info("queued", "")),
            "RetrievePropertiesEx" if n < 4 => (200, vec![], task_info("running", "")),
            "RetrievePropertiesEx" => (200, vec![], task_info("success", "")),
            m => (500, vec![], fault("MethodNotFound", "", m)),
        })
    }))
    .await;
    let mut cfg = fake.config();
    cfg.task_timeout = Duration::from_secs(60);
    let client = Client::connect(cfg).await.unwrap();
    client
        .power(&vm(), failback_vcenter::PowerOp::Off)
        .await
        .unwrap();
    assert_eq!(fake.count("RetrievePropertiesEx"), 4);
}

#[tokio::test]
async fn task_error_message_and_typed_faults() {
    let fake = RecordedVcenter::start(Arc::new(|req: &Seen, _n| {
        base(req).unwrap_or_else(|| match req.method.as_str() {
            "ResetVM_Task" => (200, vec![], task_returned("ResetVM_Task")),
            "RetrievePropertiesEx" => (
                200,
                vec![],
                task_info(
                    "error",
                    r#"<error><fault XMLSchema-instance:type="NoPermission"><object type="VirtualMachine">vm-63</object><privilegeId>VirtualMachine.Interact.Reset</privilegeId></fault><localizedMessage>Permission to perform this operation was denied.</localizedMessage></error>"#,
                ),
            ),
            "PowerOnVM_Task" => (
                500,
                vec![],
                fault("FileNotFound", "<file>[ds1] web01/web01.vmx</file>", "File [ds1] web01/web01.vmx was not found"),
            ),
            m => (500, vec![], fault("MethodNotFound", "", m)),
        })
    }))
    .await;
    let client = Client::connect(fake.config()).await.unwrap();
    let err = client
        .power(&vm(), failback_vcenter::PowerOp::Reset)
        .await
        .unwrap_err();
    assert_eq!(
        err.fault_kind(),
        Some(&FaultKind::NoPermission {
            object: Some("vm-63".into()),
            privilege: Some("VirtualMachine.Interact.Reset".into())
        })
    );
    let msg = err.to_string();
    assert!(
        msg.contains("Permission to perform this operation was denied") && msg.contains("web01"),
        "{msg}"
    );
    let err = client
        .power(&vm(), failback_vcenter::PowerOp::On)
        .await
        .unwrap_err();
    assert_eq!(
        err.fault_kind(),
        Some(&FaultKind::FileNotFound {
            file: Some("[ds1] web01/web01.vmx".into())
        })
    );
    assert!(!err.is_transient());
}

#[tokio::test]
async fn quoted_cookie_is_sent_back_verbatim() {
    let fake = RecordedVcenter::start(Arc::new(|req: &Seen, _n| {
        base(req).unwrap_or_else(|| match req.method.as_str() {
            "PowerOnVM_Task" => (200, vec![], task_returned("PowerOnVM_Task")),
            "RetrievePropertiesEx" => (200, vec![], task_info("success", "")),
            m => (500, vec![], fault("MethodNotFound", "", m)),
        })
    }))
    .await;
    let client = Client::connect(fake.config()).await.unwrap();
    assert_eq!(client.session_cookie().as_deref(), Some("\"52a0-quoted\""));
    client
        .power(&vm(), failback_vcenter::PowerOp::On)
        .await
        .unwrap();
    let seen = fake.seen();
    let after_login: Vec<&Seen> = seen
        .iter()
        .skip_while(|r| r.method != "Login")
        .skip(1)
        .collect();
    assert!(!after_login.is_empty());
    for r in after_login {
        assert_eq!(
            r.cookie.as_deref(),
            Some("vmware_soap_session=\"52a0-quoted\""),
            "{}",
            r.method
        );
    }
    // The login request carried the credentials, escaped.
    let login = seen.iter().find(|r| r.method == "Login").unwrap();
    assert!(
        login
            .body
            .contains("<userName>user</userName><password>pass</password>"),
        "{}",
        login.body
    );
}

#[tokio::test]
async fn session_expired_twice_relogs_in_once_then_fails() {
    // Login succeeds, but the server keeps saying NotAuthenticated (as after a vCenter
    // restart with a broken SSO): re-login exactly once, then a clear error.
    let fake = RecordedVcenter::start(Arc::new(|req: &Seen, _n| {
        base(req).unwrap_or_else(|| (500, vec![], fault("NotAuthenticated", "<object type=\"Folder\">group-d1</object><privilegeId>System.View</privilegeId>", "The session is not authenticated.")))
    }))
    .await;
    let client = Client::connect(fake.config()).await.unwrap();
    assert_eq!(fake.count("Login"), 1);
    let err = client
        .power(&vm(), failback_vcenter::PowerOp::On)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::SessionExpired { .. }), "{err:?}");
    assert_eq!(err.fault_kind(), Some(&FaultKind::NotAuthenticated));
    assert!(
        err.to_string().contains(&fake.url) && err.to_string().contains("web01"),
        "{err}"
    );
    assert_eq!(fake.count("Login"), 2, "re-login exactly once");
    assert_eq!(client.login_count(), 2);
    assert_eq!(fake.count("PowerOnVM_Task"), 2, "the call was retried once");
}

#[tokio::test]
async fn expired_session_in_property_collector_missing_set() {
    // vcsim/vCenter report an expired session to RetrievePropertiesEx as HTTP 200 with a
    // missingSet fault, not as a SOAP fault: that must also trigger the re-login.
    let fake = RecordedVcenter::start(Arc::new(|req: &Seen, n| {
        base(req).unwrap_or_else(|| match req.method.as_str() {
            "PowerOnVM_Task" => (200, vec![], task_returned("PowerOnVM_Task")),
            "RetrievePropertiesEx" if n == 1 => (200, vec![], envelope(
                r#"<RetrievePropertiesExResponse xmlns="urn:vim25"><returnval><objects><obj type="Task">task-7</obj><missingSet><path>info</path><fault><fault xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="NotAuthenticated"></fault><localizedMessage>session expired</localizedMessage></fault></missingSet></objects></returnval></RetrievePropertiesExResponse>"#,
            )),
            "RetrievePropertiesEx" => (200, vec![], task_info("success", "")),
            m => (500, vec![], fault("MethodNotFound", "", m)),
        })
    }))
    .await;
    let client = Client::connect(fake.config()).await.unwrap();
    client
        .power(&vm(), failback_vcenter::PowerOp::On)
        .await
        .unwrap();
    assert_eq!(fake.count("Login"), 2);
}

#[tokio::test]
async fn garbage_and_http_errors_name_the_url() {
    let fake = RecordedVcenter::start(Arc::new(|req: &Seen, _n| {
        base(req).unwrap_or_else(|| match req.method.as_str() {
            "PowerOnVM_Task" => (200, vec![], "<not-soap".into()),
            _ => (503, vec![], "Service Unavailable".into()),
        })
    }))
    .await;
    let client = Client::connect(fake.config()).await.unwrap();
    let err = client
        .power(&vm(), failback_vcenter::PowerOp::On)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Protocol { .. }) && err.to_string().contains(&fake.url),
        "{err:?}"
    );
    let err = client
        .power(&vm(), failback_vcenter::PowerOp::Off)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::HttpStatus { status: 503, .. }) && err.is_transient(),
        "{err:?}"
    );
    // Nothing listening: a transport error naming the URL.
    let mut cfg = Config::new("http://127.0.0.1:9/sdk", "u", "p");
    cfg.request_timeout = Duration::from_secs(5);
    let err = Client::connect(cfg).await.unwrap_err();
    assert!(
        matches!(err, Error::Http { .. }) && err.to_string().contains("127.0.0.1:9"),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_share_one_relogin() {
    // Session 1 expires; 16 calls fail at once; exactly one re-login serves them all.
    let fake = RecordedVcenter::start(Arc::new(|req: &Seen, n| match req.method.as_str() {
        "RetrieveServiceContent" => (200, vec![], service_content()),
        "Login" => (
            200,
            vec![(
                "Set-Cookie".into(),
                format!("vmware_soap_session=s{n}; Path=/"),
            )],
            login_ok(),
        ),
        _ if req.cookie.as_deref() != Some("vmware_soap_session=s2") => (
            500,
            vec![],
            fault("NotAuthenticated", "", "The session is not authenticated."),
        ),
        "PowerOnVM_Task" => (200, vec![], task_returned("PowerOnVM_Task")),
        "RetrievePropertiesEx" => (200, vec![], task_info("success", "")),
        m => (500, vec![], fault("MethodNotFound", "", m)),
    }))
    .await;
    let client = Client::connect(fake.config()).await.unwrap();
    let calls = (0..16).map(|_| {
        let c = client.clone();
        tokio::spawn(async move { c.power(&vm(), failback_vcenter::PowerOp::On).await })
    });
    for r in futures::future::join_all(calls).await {
        r.unwrap().unwrap();
    }
    assert_eq!(fake.count("Login"), 2, "one re-login for all");
    assert_eq!(client.login_count(), 2);
}
