//! What the installed release of the schema has: the library may run against
//! an older one until `ALTER EXTENSION synapse UPDATE`, and must keep working.

/// Whether `synapse.<table>` has `column`; syscache lookups only.
pub fn has_column(table: &std::ffi::CStr, column: &std::ffi::CStr) -> bool {
    // SAFETY: catalogue lookups by name, inside a transaction; each answers
    // InvalidOid (or 0) when the object does not exist.
    unsafe {
        let schema = pgrx::pg_sys::get_namespace_oid(c"synapse".as_ptr(), true);
        if schema == pgrx::pg_sys::InvalidOid {
            return false;
        }
        let relation = pgrx::pg_sys::get_relname_relid(table.as_ptr(), schema);
        relation != pgrx::pg_sys::InvalidOid
            && pgrx::pg_sys::get_attnum(relation, column.as_ptr()) > 0
    }
}
