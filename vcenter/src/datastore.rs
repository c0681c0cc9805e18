//! Datacenters, datastores and datastore file transfer (`/folder` HTTP API).

use crate::client::{Client, MoRef};
use crate::error::{Error, Result};
use bytes::Bytes;
use reqwest::Url;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::io::AsyncReadExt;

/// Splits `[datastore] path/to/file` into (`datastore`, `path/to/file`).
pub fn parse_datastore_path(s: &str) -> Option<(String, String)> {
    let (ds, path) = s.trim().strip_prefix('[')?.split_once(']')?;
    Some((ds.to_string(), path.trim().to_string()))
}

/// Transfer progress, called after every chunk.
pub trait TransferProgress: Send + Sync {
    fn progress(&self, done: u64, total: u64);
}

/// Ignores progress.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl TransferProgress for NoProgress {
    fn progress(&self, _done: u64, _total: u64) {}
}

/// A datastore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatastoreInfo {
    pub name: String,
    pub moref: MoRef,
    pub capacity_bytes: Option<u64>,
    pub free_bytes: Option<u64>,
    pub accessible: bool,
}

/// Upload options.
#[derive(Debug, Clone, Copy, Default)]
pub struct UploadOptions {
    /// After the size check, download the file back and compare its SHA-256 with the
    /// local file's (computed while uploading).
    pub verify_sha256: bool,
}

/// What an upload did and checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadReport {
    /// `[datastore] path`
    pub datastore_path: String,
    pub url: String,
    pub bytes: u64,
    /// SHA-256 of the local file (hex).
    pub sha256: String,
    /// Size the server reports (HEAD) after the upload.
    pub remote_size: u64,
    /// True when the file was read back and its SHA-256 matched.
    pub sha256_verified: bool,
}

const CHUNK: usize = 1 << 20;

impl Client {
    /// Every datacenter name.
    pub async fn datacenters(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = self
            .retrieve_all("list datacenters", "Datacenter", &["name"])
            .await?
            .iter()
            .filter_map(|o| o.text("name").map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }

    /// The datacenter for datastore file access: the configured one (checked), else the
    /// only one.
    pub async fn datacenter(&self) -> Result<String> {
        let all = self.datacenters().await?;
        let url = self.url().to_string();
        match &self.inner.cfg.datacenter {
            Some(dc) if all.contains(dc) || dc.contains('/') => Ok(dc.clone()),
            Some(dc) => Err(Error::Datacenter {
                detail: format!("'{dc}' not found (available: {all:?})"),
                url,
            }),
            None => match all.as_slice() {
                [one] => Ok(one.clone()),
                [] => Err(Error::Datacenter {
                    detail: "no datacenter".into(),
                    url,
                }),
                _ => Err(Error::Datacenter {
                    detail: format!("several datacenters {all:?}; choose one (--datacenter)"),
                    url,
                }),
            },
        }
    }

    /// Every datastore, sorted by name.
    pub async fn datastores(&self) -> Result<Vec<DatastoreInfo>> {
        let objs = self
            .retrieve_all(
                "list datastores",
                "Datastore",
                &[
                    "name",
                    "summary.capacity",
                    "summary.freeSpace",
                    "summary.accessible",
                ],
            )
            .await?;
        let mut out: Vec<DatastoreInfo> = objs
            .iter()
            .map(|o| DatastoreInfo {
                name: o.text("name").unwrap_or_default().to_string(),
                moref: o.obj.clone(),
                capacity_bytes: o.text("summary.capacity").and_then(|s| s.parse().ok()),
                free_bytes: o.text("summary.freeSpace").and_then(|s| s.parse().ok()),
                accessible: o.text("summary.accessible") != Some("false"),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out.dedup_by(|a, b| a.name == b.name);
        Ok(out)
    }

    /// The named datastore, or `DatastoreNotFound` listing the ones that exist.
    pub async fn datastore(&self, name: &str) -> Result<DatastoreInfo> {
        let all = self.datastores().await?;
        all.iter()
            .find(|d| d.name == name)
            .cloned()
            .ok_or_else(|| Error::DatastoreNotFound {
                datastore: name.to_string(),
                url: self.url().to_string(),
                available: all.iter().map(|d| d.name.clone()).collect(),
            })
    }

    /// `https://host/folder/PATH?dcPath=DC&dsName=DS`
    pub fn datastore_file_url(&self, datacenter: &str, datastore: &str, path: &str) -> Result<Url> {
        let mut u = self.inner.sdk.clone();
        {
            let mut segs = u
                .path_segments_mut()
                .map_err(|_| Error::Config(format!("URL {} cannot be a base", self.url())))?;
            segs.clear().push("folder");
            for s in path.trim_start_matches('/').split('/') {
                segs.push(s);
            }
        }
        u.query_pairs_mut()
            .clear()
            .append_pair("dcPath", datacenter)
            .append_pair("dsName", datastore);
        Ok(u)
    }

    /// Size of a datastore file (HEAD), `None` when it does not exist. Checks that the
    /// datastore exists first, so a wrong datastore name is not reported as a missing file.
    pub async fn datastore_file_size(&self, datastore: &str, path: &str) -> Result<Option<u64>> {
        self.datastore(datastore).await?;
        let dc = self.datacenter().await?;
        let url = self.datastore_file_url(&dc, datastore, path)?;
        self.head_size(&url, &format!("check '[{datastore}] {path}'"))
            .await
    }

    async fn head_size(&self, url: &Url, what: &str) -> Result<Option<u64>> {
        let resp = self
            .inner
            .http
            .head(url.clone())
            .send()
            .await
            .map_err(|source| Error::Http {
                what: what.to_string(),
                url: url.to_string(),
                source,
            })?;
        match resp.status().as_u16() {
            200 => Ok(Some(
                resp.headers()
                    .get(reqwest::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| Error::Protocol {
                        what: what.to_string(),
                        url: url.to_string(),
                        detail: "HEAD without Content-Length".into(),
                    })?,
            )),
            404 => Ok(None),
            s => Err(Error::HttpStatus {
                what: what.to_string(),
                url: url.to_string(),
                status: s,
                body: String::new(),
            }),
        }
    }

    /// Errors with `DatastoreFileNotFound` unless the file exists; returns its size.
    pub async fn require_datastore_file(&self, datastore: &str, path: &str) -> Result<u64> {
        match self.datastore_file_size(datastore, path).await? {
            Some(n) => Ok(n),
            None => {
                let dc = self.datacenter().await?;
                Err(Error::DatastoreFileNotFound {
                    datastore: datastore.to_string(),
                    path: path.to_string(),
                    url: self.datastore_file_url(&dc, datastore, path)?.to_string(),
                })
            }
        }
    }

    /// Uploads a local file to `[datastore] path` (parents created by the server), streaming,
    /// hashing as it reads. Then checks the remote size (HEAD) and, if asked, reads the file
    /// back and compares SHA-256.
    pub async fn upload(
        &self,
        local: &Path,
        datastore: &str,
        path: &str,
        opts: UploadOptions,
        progress: Arc<dyn TransferProgress>,
    ) -> Result<UploadReport> {
        let io_err = |what: &str, source| Error::Io {
            what: what.to_string(),
            path: local.to_path_buf(),
            source,
        };
        let file = tokio::fs::File::open(local)
            .await
            .map_err(|e| io_err("open", e))?;
        let total = file.metadata().await.map_err(|e| io_err("stat", e))?.len();
        self.datastore(datastore).await?;
        let dc = self.datacenter().await?;
        self.ensure_session().await?;
        let url = self.datastore_file_url(&dc, datastore, path)?;
        let what = format!("upload {} to '[{datastore}] {path}'", local.display());
        if let Some((parent, _)) = path.trim_start_matches('/').rsplit_once('/') {
            self.make_directory(&dc, datastore, parent).await?;
        }

        let hasher = Arc::new(Mutex::new(Sha256::new()));
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let state = (file, hasher.clone(), sent.clone(), progress.clone());
        let stream = futures::stream::try_unfold(state, move |(mut f, h, sent, p)| async move {
            let mut buf = vec![0u8; CHUNK];
            let n = f.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(None);
            }
            buf.truncate(n);
            h.lock().unwrap_or_else(|e| e.into_inner()).update(&buf);
            let done = sent.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst) + n as u64;
            p.progress(done, total);
            Ok(Some((Bytes::from(buf), (f, h, sent, p))))
        });
        let resp = self
            .inner
            .http
            .put(url.clone())
            .header(reqwest::header::CONTENT_LENGTH, total)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
            .map_err(|source| Error::Http {
                what: what.clone(),
                url: url.to_string(),
                source,
            })?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(Error::HttpStatus {
                what,
                url: url.to_string(),
                status: status.as_u16(),
                body: body.chars().take(300).collect(),
            });
        }
        let bytes = sent.load(std::sync::atomic::Ordering::SeqCst);
        if bytes != total {
            return Err(Error::Verify {
                url: url.to_string(),
                detail: format!(
                    "{} changed during upload: sent {bytes} bytes, expected {total}",
                    local.display()
                ),
            });
        }
        let sha256 = hex::encode(
            hasher
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .finalize(),
        );
        let remote_size = self
            .head_size(&url, &format!("check size of '[{datastore}] {path}'"))
            .await?
            .ok_or_else(|| Error::Verify {
                url: url.to_string(),
                detail: "file missing right after upload".into(),
            })?;
        if remote_size != total {
            return Err(Error::Verify {
                url: url.to_string(),
                detail: format!("size after upload is {remote_size} bytes, local file has {total}"),
            });
        }
        let mut sha256_verified = false;
        if opts.verify_sha256 {
            let remote = self.sha256_of_url(&url, &what).await?;
            if remote != sha256 {
                return Err(Error::Verify {
                    url: url.to_string(),
                    detail: format!("SHA-256 read back {remote} != local {sha256}"),
                });
            }
            sha256_verified = true;
        }
        Ok(UploadReport {
            datastore_path: format!("[{datastore}] {path}"),
            url: url.to_string(),
            bytes: total,
            sha256,
            remote_size,
            sha256_verified,
        })
    }

    /// Creates `[datastore] dir` and its parents (`FileManager.MakeDirectory`); an existing
    /// directory is fine. Real vCenter does not create parents on PUT (vcsim does).
    pub async fn make_directory(&self, datacenter: &str, datastore: &str, dir: &str) -> Result<()> {
        let Some(fm) = self.inner.sc.file_manager.clone() else {
            return Ok(()); // ESXi without FileManager: rely on PUT
        };
        let what = format!("create directory '[{datastore}] {dir}'");
        let dc_ref = self
            .retrieve_all(&what, "Datacenter", &["name"])
            .await?
            .into_iter()
            .find(|o| o.text("name") == Some(datacenter))
            .map(|o| o.obj);
        let dc_xml = dc_ref.map(|m| m.to_xml("datacenter")).unwrap_or_default();
        let body = crate::client::request(
            "MakeDirectory",
            &fm,
            &format!(
                "<name>{}</name>{dc_xml}<createParentDirectories>true</createParentDirectories>",
                crate::xml::escape(&format!("[{datastore}] {dir}"))
            ),
        );
        match self.call(&what, &body).await {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.fault_kind(), Some(crate::FaultKind::Other(t)) if t == "FileAlreadyExists") => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes `[datastore] path` (`FileManager.DeleteDatastoreFile_Task`). Returns false when
    /// the file was not there (deleting twice, e.g. after a resume, is fine).
    pub async fn delete_datastore_file(&self, datastore: &str, path: &str) -> Result<bool> {
        if self.datastore_file_size(datastore, path).await?.is_none() {
            return Ok(false);
        }
        let Some(fm) = self.inner.sc.file_manager.clone() else {
            return Err(Error::Config(format!(
                "cannot delete '[{datastore}] {path}': this endpoint has no FileManager"
            )));
        };
        let dc = self.datacenter().await?;
        let what = format!("delete '[{datastore}] {path}'");
        let dc_xml = self
            .retrieve_all(&what, "Datacenter", &["name"])
            .await?
            .into_iter()
            .find(|o| o.text("name") == Some(dc.as_str()))
            .map(|o| o.obj.to_xml("datacenter"))
            .unwrap_or_default();
        let body = crate::client::request(
            "DeleteDatastoreFile_Task",
            &fm,
            &format!(
                "<name>{}</name>{dc_xml}",
                crate::xml::escape(&format!("[{datastore}] {path}"))
            ),
        );
        match self.run_task(&what, &body).await {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.fault_kind(), Some(crate::FaultKind::FileNotFound { .. })) => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// SHA-256 (hex) of a datastore file, streamed.
    pub async fn datastore_file_sha256(&self, datastore: &str, path: &str) -> Result<String> {
        self.datastore(datastore).await?;
        let dc = self.datacenter().await?;
        let url = self.datastore_file_url(&dc, datastore, path)?;
        self.sha256_of_url(&url, &format!("read '[{datastore}] {path}'"))
            .await
    }

    async fn sha256_of_url(&self, url: &Url, what: &str) -> Result<String> {
        let http_err = |source| Error::Http {
            what: what.to_string(),
            url: url.to_string(),
            source,
        };
        let mut resp = self
            .inner
            .http
            .get(url.clone())
            .send()
            .await
            .map_err(http_err)?;
        if !resp.status().is_success() {
            return Err(Error::HttpStatus {
                what: what.to_string(),
                url: url.to_string(),
                status: resp.status().as_u16(),
                body: String::new(),
            });
        }
        let mut h = Sha256::new();
        while let Some(chunk) = resp.chunk().await.map_err(http_err)? {
            h.update(&chunk);
        }
        Ok(hex::encode(h.finalize()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn datastore_paths() {
        assert_eq!(
            super::parse_datastore_path("[LocalDS_0] isos/a b.iso"),
            Some(("LocalDS_0".into(), "isos/a b.iso".into()))
        );
        assert_eq!(super::parse_datastore_path("isos/a.iso"), None);
    }
}
