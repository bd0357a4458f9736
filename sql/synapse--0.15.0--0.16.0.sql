-- 0.15.0 → 0.16.0: edges keep room on their pages to be resolved in place.
-- An edge is written once more, when it resolves, and its row grows then
-- (resolved_at): on a full page that new version goes to another page, with
-- an entry in each index. With 60 % of each page left free, every edge of a
-- page can be resolved on it (a HOT update, no index entry), even when one
-- statement resolves them all (a fan-out's root). Pages written from now on
-- keep that room; those written before keep what they have.
ALTER TABLE synapse.edges SET (fillfactor = 40);
