-- Check 1: no narrow-set sample has a held-out category.
-- A narrow-set sample offends when its category is held out (a human review's confirmed category, when there is
-- one, else its own), or when its prompt is not a training prompt of this run (unknown provenance). Unless a
-- human review confirmed the prompt in a narrow category (audit_confirmed), it also offends when its training
-- prompt's category is held out, when that category's confidence is below narrow_min_confidence, or when
-- selection did not mark the prompt in_narrow (doubtful category or near-duplicate of a held-out prompt).
INSERT INTO verify_offenses
SELECT 'narrow_categories', s.sample_id,
       CASE WHEN NOT coalesce(list_contains(getvariable('narrow_categories')::VARCHAR[], coalesce(c.category, s.category)), false)
                THEN 'sample category ' || coalesce(c.category, s.category, 'NULL') || ' is held out'
            WHEN t.prompt_id IS NULL THEN 'prompt id ' || s.prompt_id || ' is not a training prompt of this run'
            WHEN NOT list_contains(getvariable('narrow_categories')::VARCHAR[], t.category)
                THEN 'its training prompt has held-out category ' || t.category
            WHEN t.category_confidence < getvariable('narrow_min_confidence')
                THEN 'its training prompt''s category ' || t.category || ' has confidence '
                     || round(t.category_confidence, 3) || ', below narrow_min_confidence'
            ELSE 'its training prompt is not marked in_narrow' END,
       NULL, t.category, NULL
FROM verify_samples s
LEFT JOIN train_prompts t USING (prompt_id)
LEFT JOIN audit_confirmed c USING (prompt_id)
WHERE s.in_narrow_set
  AND (NOT coalesce(list_contains(getvariable('narrow_categories')::VARCHAR[], coalesce(c.category, s.category)), false)
       OR t.prompt_id IS NULL
       OR (c.prompt_id IS NULL
           AND (NOT list_contains(getvariable('narrow_categories')::VARCHAR[], t.category)
                OR t.category_confidence < getvariable('narrow_min_confidence')
                OR NOT t.in_narrow)));
