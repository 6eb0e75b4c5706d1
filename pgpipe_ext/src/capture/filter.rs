//! `pgpipe.row_filter_sql(filter pg_node_tree, tbl regclass, alias text)`: a row filter
//! (the tree Postgres stored for pgpipe's check, see `pgpipe.check_row_filter`) as SQL
//! whose column references are qualified by `alias`: `new.total > 100::numeric` for the
//! WHEN clause of an INSERT trigger, `old.` and `new.` for the UPDATE triggers, `t.` for
//! a snapshot's query. It is Postgres's own deparser (`deparse_expression` with a context
//! naming the table `alias`), so the text means exactly the tree: operators and functions
//! are printed schema-qualified where the caller's search_path would not find them.
//!
//! Internal: EXECUTE is revoked from PUBLIC (a pg_node_tree can only come from the
//! catalogs, but nobody needs to call this but pgpipe's own functions).

use std::ffi::c_char;

use pgrx::pg_sys;
use pgrx::prelude::*;

function_info_v1!(pg_finfo_pgpipe_row_filter_sql);

/// `pgpipe.row_filter_sql(filter pg_node_tree, tbl regclass, alias text) RETURNS text`,
/// STRICT.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn pgpipe_row_filter_sql(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: a STRICT function of three arguments: all three are set and not null; the
    // first and third are varlenas (pg_node_tree, text), the second an oid.
    unsafe {
        let args = (*fcinfo).args.as_slice(3);
        let tree = pg_sys::text_to_cstring(args[0].value.cast_mut_ptr());
        let relid = pg_sys::Oid::from(args[1].value.value() as u32);
        let alias = pg_sys::text_to_cstring(args[2].value.cast_mut_ptr());
        let sql = deparse(tree, relid, alias);
        pg_sys::Datum::from(pg_sys::cstring_to_text(sql))
    }
}

/// # Safety
/// `tree` is a node tree's text (from the catalogs), `alias` a C string, `relid` a table.
unsafe fn deparse(tree: *const c_char, relid: pg_sys::Oid, alias: *const c_char) -> *const c_char {
    // SAFETY: see the contract; stringToNode reads what nodeToString wrote; the context
    // has one range table entry (varno 1), the table, named `alias`.
    unsafe {
        let node = pg_sys::stringToNode(tree) as *mut pg_sys::Node;
        let context = pg_sys::deparse_context_for(alias, relid);
        // forceprefix: every column as alias.column; no implicit casts shown.
        pg_sys::deparse_expression(node, context, true, false)
    }
}
