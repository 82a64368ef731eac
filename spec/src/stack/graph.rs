//! The order of first starts implied by `depends_on`, and its cycles.

use std::collections::{BTreeMap, BTreeSet};

use super::error::StackError;
use crate::ServiceSpec;

/// Names in an order where each comes after everything it depends on
/// (ties by name); edges to names outside `graph` are ignored. A cycle is
/// an error naming it: `web -> api -> web`.
pub(crate) fn order(graph: &BTreeMap<String, Vec<String>>) -> Result<Vec<String>, StackError> {
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let mut out = Vec::new();
    for name in graph.keys() {
        let mut trail = Vec::new();
        visit(name, graph, &mut trail, &mut done, &mut out)?;
    }
    Ok(out)
}

fn visit<'a>(
    name: &'a str,
    graph: &'a BTreeMap<String, Vec<String>>,
    trail: &mut Vec<&'a str>,
    done: &mut BTreeSet<&'a str>,
    out: &mut Vec<String>,
) -> Result<(), StackError> {
    if done.contains(name) {
        return Ok(());
    }
    if let Some(start) = trail.iter().position(|n| *n == name) {
        let mut cycle: Vec<String> = trail[start..].iter().map(|n| n.to_string()).collect();
        cycle.push(name.to_string());
        return Err(StackError::Cycle { cycle });
    }
    let Some(deps) = graph.get(name) else {
        return Ok(());
    };
    trail.push(name);
    let mut sorted: Vec<&String> = deps.iter().collect();
    sorted.sort();
    for dep in sorted {
        visit(dep, graph, trail, done, out)?;
    }
    trail.pop();
    done.insert(name);
    out.push(name.to_string());
    Ok(())
}

/// See [`super::start_order`].
pub(crate) fn start_order(services: &[ServiceSpec]) -> Result<Vec<String>, StackError> {
    let graph = services
        .iter()
        .map(|s| {
            let deps = s.depends_on.iter().map(|d| d.service.clone()).collect();
            (s.name.clone(), deps)
        })
        .collect();
    order(&graph)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        edges
            .iter()
            .map(|(n, deps)| (n.to_string(), deps.iter().map(|d| d.to_string()).collect()))
            .collect()
    }

    #[test]
    fn dependencies_start_first() {
        let g = graph(&[
            ("web", &["api", "cache"]),
            ("api", &["db"]),
            ("db", &[]),
            ("cache", &[]),
        ]);
        assert_eq!(order(&g).unwrap(), ["db", "api", "cache", "web"]);
    }

    #[test]
    fn a_cycle_is_named_in_order() {
        let g = graph(&[("web", &["api"]), ("api", &["web"])]);
        let err = order(&g).unwrap_err();
        assert_eq!(
            err.to_string(),
            "depends_on forms a cycle: api -> web -> api; remove one of these dependencies"
        );
    }
}
