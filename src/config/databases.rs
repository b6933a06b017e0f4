//! Which databases of a server a target with `databases` patterns stands for. Pure: the
//! listing itself is [`crate::postgres::discovery`]'s, the expansion [`crate::watch::discovery`]'s.

/// Which databases of a server a template target stands for.
#[derive(Debug, Clone)]
pub(crate) struct Discovery {
    pub(crate) include: Vec<glob::Pattern>,
    pub(crate) exclude: Vec<glob::Pattern>,
}

impl Discovery {
    /// The names that match an `include` pattern and no `exclude` pattern, in the given order.
    pub(crate) fn select<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        names
            .into_iter()
            .filter(|name| self.include.iter().any(|p| p.matches(name)))
            .filter(|name| !self.exclude.iter().any(|p| p.matches(name)))
            .map(str::to_string)
            .collect()
    }
}

/// The name of the target discovered for `database` under `template`.
pub(crate) fn discovered_name(template: &str, database: &str) -> String {
    format!("{template}/{database}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn discovery(include: &[&str], exclude: &[&str]) -> Discovery {
        let patterns = |list: &[&str]| {
            list.iter()
                .map(|p| glob::Pattern::new(p).expect("pattern"))
                .collect()
        };
        Discovery {
            include: patterns(include),
            exclude: patterns(exclude),
        }
    }

    #[test]
    fn include_and_exclude_patterns_select_names_in_order() {
        let names = ["app_eu", "postgres", "app_us", "app_us_test", "reporting"];
        let d = discovery(&["app_*", "reporting"], &["*_test"]);
        assert_eq!(d.select(names), vec!["app_eu", "app_us", "reporting"]);
    }

    #[test]
    fn star_selects_everything_but_the_excluded() {
        let d = discovery(&["*"], &["postgres"]);
        assert_eq!(d.select(["postgres", "a", "b"]), vec!["a", "b"]);
    }

    #[test]
    fn nothing_matches_gives_no_targets() {
        let d = discovery(&["shop_*"], &[]);
        assert!(d.select(["app", "postgres"]).is_empty());
    }

    #[test]
    fn character_classes_and_single_characters() {
        let d = discovery(&["db[0-9]", "tenant_?"], &[]);
        assert_eq!(
            d.select(["db1", "db12", "tenant_a", "tenant_ab", "dbx"]),
            vec!["db1", "tenant_a"]
        );
    }

    #[test]
    fn discovered_names_keep_the_template_in_front() {
        assert_eq!(discovered_name("prod", "app_eu"), "prod/app_eu");
    }
}
