//! The operator's verbs besides `snapshot` and `backup`: jobs, cancel,
//! watch, nodes, create, info, and a backup chain's restore and verify.

pub mod cancel;
pub mod create;
pub mod info;
pub mod jobs;
pub mod nodes;
pub mod restore;
pub mod verify;
pub mod watch;

/// A plain text table: a header and left-aligned columns two spaces apart.
pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s += c;
            } else {
                s += &format!("{c:<w$}  ", w = width[i]);
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in &rows {
        out += &line(r.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_aligns() {
        let t = super::table(
            &["ID", "STATUS"],
            vec![
                vec!["job-long".into(), "running".into()],
                vec!["j".into(), "ready".into()],
            ],
        );
        assert_eq!(t, "ID        STATUS\njob-long  running\nj         ready\n");
    }
}
