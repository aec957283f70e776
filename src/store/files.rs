//! The per-topic JSON file mirror: `<dir>/<id>.json`, rewritten atomically
//! (temp file + rename) after every step, for people who just want files.
//! Not a source of truth: the store is.

use std::path::{Path, PathBuf};

use crate::state::TopicState;

#[derive(Debug, Clone)]
pub struct FileMirror {
    dir: PathBuf,
}

impl FileMirror {
    pub fn new(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path_for(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes the state on the blocking pool; errors are returned, not
    /// swallowed, so the caller can log them.
    pub async fn write(&self, state: &TopicState) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
        let path = self.path_for(&state.id);
        tokio::task::spawn_blocking(move || {
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, &json)?;
            std::fs::rename(&tmp, &path)
        })
        .await
        .map_err(std::io::Error::other)?
    }
}
