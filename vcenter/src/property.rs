//! Property collector reads and task waiting.

use crate::client::{decode_method_fault, request, Client, MoRef};
use crate::error::{Error, Result};
use crate::xml::{escape, Element};
use std::time::{Duration, Instant};

/// One object's properties as returned by `RetrievePropertiesEx`.
#[derive(Debug, Clone)]
pub struct ObjectContent {
    pub obj: MoRef,
    pub props: Vec<(String, Element)>,
}

impl ObjectContent {
    /// The `val` element of a property.
    pub fn get(&self, name: &str) -> Option<&Element> {
        self.props.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    pub fn text(&self, name: &str) -> Option<&str> {
        self.get(name).map(|v| v.text.as_str())
    }
}

fn prop_spec(kind: &str, paths: &[&str]) -> String {
    let mut s = format!("<propSet><type>{}</type>", escape(kind));
    for p in paths {
        s.push_str(&format!("<pathSet>{}</pathSet>", escape(p)));
    }
    s.push_str("</propSet>");
    s
}

fn parse_objects(rv: &Element) -> Vec<ObjectContent> {
    rv.children_named("objects")
        .filter_map(|o| {
            let obj = o.child("obj").and_then(MoRef::from_element)?;
            let props = o
                .children_named("propSet")
                .filter_map(|p| Some((p.text_of("name")?.to_string(), p.child("val")?.clone())))
                .collect();
            Some(ObjectContent { obj, props })
        })
        .collect()
}

/// Task outcome as read from `Task.info`.
#[derive(Debug, Clone)]
pub(crate) struct TaskInfo {
    pub state: String,
    pub error: Option<Element>,
    pub result: Option<Element>,
}

impl Client {
    /// `RetrievePropertiesEx` (+ `ContinueRetrievePropertiesEx` pages) for one spec.
    pub(crate) async fn retrieve(&self, what: &str, spec_set: &str) -> Result<Vec<ObjectContent>> {
        let pc = self.inner.sc.property_collector.clone();
        let body = request(
            "RetrievePropertiesEx",
            &pc,
            &format!(
                "<specSet>{spec_set}</specSet><options><maxObjects>500</maxObjects></options>"
            ),
        );
        let resp = self.call(what, &body).await?;
        let mut out = Vec::new();
        let mut rv = resp.child("returnval").cloned();
        while let Some(r) = rv.take() {
            out.extend(parse_objects(&r));
            if let Some(token) = r.text_of("token") {
                let body = request(
                    "ContinueRetrievePropertiesEx",
                    &pc,
                    &format!("<token>{}</token>", escape(token)),
                );
                rv = self.call(what, &body).await?.child("returnval").cloned();
            }
        }
        Ok(out)
    }

    /// Properties of one object. Errors if the object does not exist.
    pub(crate) async fn retrieve_one(
        &self,
        what: &str,
        obj: &MoRef,
        paths: &[&str],
    ) -> Result<ObjectContent> {
        let spec = format!(
            "{}<objectSet>{}<skip>false</skip></objectSet>",
            prop_spec(&obj.kind, paths),
            obj.to_xml("obj")
        );
        let mut objs = self.retrieve(what, &spec).await?;
        if objs.is_empty() {
            return Err(Error::Fault {
                what: what.to_string(),
                fault: Box::new(crate::error::Fault {
                    kind: crate::error::FaultKind::ManagedObjectNotFound {
                        obj: Some(obj.value.clone()),
                    },
                    message: format!("{} {} returned no properties", obj.kind, obj.value),
                }),
            });
        }
        Ok(objs.swap_remove(0))
    }

    /// Properties of every object of `kind` below the root folder, through a container
    /// view that is destroyed afterwards.
    pub(crate) async fn retrieve_all(
        &self,
        what: &str,
        kind: &str,
        paths: &[&str],
    ) -> Result<Vec<ObjectContent>> {
        let sc = &self.inner.sc;
        let body = request(
            "CreateContainerView",
            &sc.view_manager,
            &format!(
                "{}<type>{}</type><recursive>true</recursive>",
                sc.root_folder.to_xml("container"),
                escape(kind)
            ),
        );
        let resp = self.call(what, &body).await?;
        let view = resp
            .child("returnval")
            .and_then(MoRef::from_element)
            .ok_or_else(|| Error::Protocol {
                what: what.to_string(),
                url: self.url().to_string(),
                detail: "CreateContainerView returned no view".into(),
            })?;
        let spec = format!(
            "{}<objectSet>{}<skip>true</skip><selectSet xsi:type=\"TraversalSpec\"><name>view</name><type>ContainerView</type><path>view</path><skip>false</skip></selectSet></objectSet>",
            prop_spec(kind, paths),
            view.to_xml("obj")
        );
        let result = self.retrieve(what, &spec).await;
        if let Err(e) = self
            .call("DestroyView", &request("DestroyView", &view, ""))
            .await
        {
            tracing::warn!(error = %e, "could not destroy container view");
        }
        result
    }

    pub(crate) async fn task_info(&self, what: &str, task: &MoRef) -> Result<TaskInfo> {
        let oc = self.retrieve_one(what, task, &["info"]).await?;
        let info = oc.get("info").ok_or_else(|| Error::Protocol {
            what: what.to_string(),
            url: self.url().to_string(),
            detail: format!("task {} has no info", task.value),
        })?;
        Ok(TaskInfo {
            state: info.text_of("state").unwrap_or("unknown").to_string(),
            error: info.child("error").cloned(),
            result: info.child("result").cloned(),
        })
    }

    /// Waits for a task to end; returns `info.result` on success. Polls with back-off
    /// (100 ms growing to 2 s). A time-out leaves the task running on the server.
    pub async fn wait_task(
        &self,
        what: &str,
        task: &MoRef,
        timeout: Duration,
    ) -> Result<Option<Element>> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            let info = self.task_info(what, task).await?;
            match info.state.as_str() {
                "success" => return Ok(info.result),
                "error" => {
                    let fault = info
                        .error
                        .as_ref()
                        .map(decode_method_fault)
                        .unwrap_or_else(|| crate::error::Fault {
                            kind: crate::error::FaultKind::Other("TaskError".into()),
                            message: "task failed without error details".into(),
                        });
                    return Err(Error::TaskFailed {
                        what: what.to_string(),
                        task: task.value.clone(),
                        fault: Box::new(fault),
                    });
                }
                state => {
                    let waited = start.elapsed();
                    if waited >= timeout {
                        return Err(Error::TaskTimeout {
                            what: what.to_string(),
                            task: task.value.clone(),
                            state: state.to_string(),
                            waited,
                        });
                    }
                    tokio::time::sleep(delay.min(timeout.saturating_sub(waited))).await;
                    delay = (delay * 3 / 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Calls a `*_Task` method and waits for it with the configured task time-out.
    pub(crate) async fn run_task(&self, what: &str, body: &str) -> Result<Option<Element>> {
        let resp = self.call(what, body).await?;
        let task = resp
            .child("returnval")
            .and_then(MoRef::from_element)
            .ok_or_else(|| Error::Protocol {
                what: what.to_string(),
                url: self.url().to_string(),
                detail: "no task returned".into(),
            })?;
        self.wait_task(what, &task, self.inner.cfg.task_timeout)
            .await
    }
}
