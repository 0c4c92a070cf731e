//! Bundles into the cache (`STATE_DIR/cache`): downloaded with resume,
//! bounded by the size the desired state names, checked against their
//! sha256 off the runtime's threads, the cache pruned to what is needed.

use super::*;

impl Link {
    /// Fetches a bundle into the cache, resuming a partial download, and
    /// checks its sha256 before handing it to the install cycle.
    ///
    /// The download is bounded by the size the desired state names: a server
    /// sending more is cut off and what it sent discarded. A `.part` that is
    /// already complete (the agent stopped between the last byte and the
    /// rename) is checked and used, or discarded, never asked for again with
    /// a range past its end. Hashing runs off the runtime's threads.
    pub(super) async fn download(
        &self,
        desired: &DesiredService,
        resume: bool,
    ) -> Result<PathBuf, LinkError> {
        let sha = desired.release.sha256.to_string();
        let size = desired.size;
        let io = |what: String| move |source| LinkError::Io { what, source };
        std::fs::create_dir_all(&self.cache).map_err(io("creating the bundle cache".into()))?;
        let done = self.cache.join(format!("{sha}.tnt"));
        if done.exists() {
            return Ok(done);
        }
        let part = self.cache.join(format!("{sha}.part"));
        let mut have = std::fs::metadata(&part).map_or(0, |m| m.len());
        if have > 0 && (!resume || (size > 0 && have >= size)) {
            if size > 0 && have == size && hash_matches(&part, &sha).await {
                return self.finish_download(&part, &done);
            }
            // Not resumable here, or complete but wrong, or too long: start over.
            let _ = std::fs::remove_file(&part);
            have = 0;
        }
        let path = format!("/v1/bundles/{sha}");
        let header = request_auth::sign(
            &self.identity.key,
            &self.identity.host,
            "GET",
            &path,
            signing_time(),
            b"",
        );
        let url = format!("{}{path}", self.identity.coordinator);
        let part_for_blocking = part.clone();
        let client = self.client();
        let fetched = tokio::task::spawn_blocking(move || -> Result<(), LinkError> {
            let mut request = client.get(&url).header("Authorization", header);
            if have > 0 {
                request = request.header("Range", format!("bytes={have}-"));
            }
            let mut response = request.call().map_err(|e| LinkError::Unreachable {
                url: url.clone(),
                detail: e.to_string(),
            })?;
            let status = response.status().as_u16();
            if status != 200 && status != 206 {
                let body = response
                    .body_mut()
                    .with_config()
                    .limit(64 * 1024)
                    .read_to_vec()
                    .unwrap_or_default();
                return Err(LinkError::Refused {
                    what: "the bundle download".into(),
                    status,
                    message: error_message(&body),
                });
            }
            let start = if status == 206 { have } else { 0 };
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(status == 206)
                .write(true)
                .truncate(status == 200)
                .open(&part_for_blocking)
                .map_err(|source| LinkError::Io {
                    what: "writing the download".into(),
                    source,
                })?;
            let mut reader = response.body_mut().with_config().limit(u64::MAX).reader();
            let mut buffer = vec![0; 256 * 1024];
            let mut written = start;
            loop {
                let n = reader
                    .read(&mut buffer)
                    .map_err(|e| LinkError::Unreachable {
                        url: url.clone(),
                        detail: e.to_string(),
                    })?;
                if n == 0 {
                    break;
                }
                written += n as u64;
                if size > 0 && written > size {
                    drop(file);
                    let _ = std::fs::remove_file(&part_for_blocking);
                    return Err(LinkError::Io {
                        what: format!("the download of {}", part_for_blocking.display()),
                        source: std::io::Error::other(format!(
                            "the server sent more than the {size} bytes the desired state names; discarded"
                        )),
                    });
                }
                file.write_all(&buffer[..n])
                    .map_err(|source| LinkError::Io {
                        what: "writing the download".into(),
                        source,
                    })?;
            }
            file.sync_all().map_err(|source| LinkError::Io {
                what: "writing the download".into(),
                source,
            })
        })
        .await
        .expect("the download does not panic");
        if let Err(LinkError::Refused { status: 416, .. }) = &fetched {
            // The range is past what the server has: what is here is not a
            // prefix of it. Start over at the next attempt.
            let _ = std::fs::remove_file(&part);
        }
        fetched?;
        if !hash_matches(&part, &sha).await {
            let _ = std::fs::remove_file(&part);
            return Err(LinkError::Io {
                what: format!("the download of {sha}"),
                source: std::io::Error::other("its sha256 differs: corrupt or swapped; discarded"),
            });
        }
        self.finish_download(&part, &done)
    }

    pub(super) fn finish_download(&self, part: &Path, done: &Path) -> Result<PathBuf, LinkError> {
        std::fs::rename(part, done).map_err(|source| LinkError::Io {
            what: "finishing the download".into(),
            source,
        })?;
        self.prune_cache(done);
        Ok(done.to_owned())
    }

    /// Keeps the three newest bundles in the cache.
    pub(super) fn prune_cache(&self, keep: &Path) {
        let Ok(entries) = std::fs::read_dir(&self.cache) else {
            return;
        };
        let mut bundles: Vec<(std::time::SystemTime, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "tnt") && e.path() != keep)
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        bundles.sort();
        let excess = bundles.len().saturating_sub(2);
        for (_, path) in bundles.into_iter().take(excess) {
            let _ = std::fs::remove_file(path);
        }
    }
}
