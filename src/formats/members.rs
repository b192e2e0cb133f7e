//! Named byte members: the one interface format readers (torch files, DCP,
//! zarr) use to reach the files of a checkpoint, whether they live in a tar, a
//! decompressed gzip tar or an extracted folder.

use crate::io::bytes::ByteView;

/// Error reaching a member.
pub type MemberError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A set of named files.
pub trait Members {
    /// The bytes of a regular-file member (`name` without a leading `./`).
    fn read_member(&self, name: &str) -> Result<ByteView, MemberError>;

    /// Names of all regular-file members, in archive order.
    fn member_names(&self) -> Vec<String>;

    /// Names of regular-file members under `dir/` (recursively), in archive order.
    fn members_under(&self, dir: &str) -> Vec<String> {
        let prefix = format!("{}/", dir.trim_end_matches('/'));
        self.member_names()
            .into_iter()
            .filter(|n| n.starts_with(&prefix))
            .collect()
    }
}

/// An in-memory member set, for tests and generated inputs.
#[derive(Debug, Default, Clone)]
pub struct MemoryMembers {
    files: Vec<(String, ByteView)>,
}

impl MemoryMembers {
    /// Adds (or replaces) a file.
    pub fn insert(&mut self, name: &str, bytes: Vec<u8>) {
        self.files.retain(|(n, _)| n != name);
        self.files
            .push((name.to_string(), ByteView::from_vec(bytes)));
    }
}

impl Members for MemoryMembers {
    fn read_member(&self, name: &str) -> Result<ByteView, MemberError> {
        self.files
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| format!("no member `{name}`").into())
    }

    fn member_names(&self) -> Vec<String> {
        self.files.iter().map(|(n, _)| n.clone()).collect()
    }
}
