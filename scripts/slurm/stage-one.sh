#!/bin/bash
# Submit stage one to SLURM: the extraction array, then the teacher array once every extraction task is done,
# then one small job that writes the merged manifest.json of both folders (needed only by readers that cannot
# list a folder, such as a plain HTTP server; pcd merges part manifests itself).
#   SCANS=/data/scannet/scans WORK=/shared/pcd CLIP=ViT-B-32.pt CLIPCAP=conceptual_weights.pt \
#     bash scripts/slurm/stage-one.sh
set -euo pipefail
: "${SCANS:?}" "${WORK:?}"
here=$(dirname "$0")
PCD=${PCD:-pcd}
extract=$(sbatch --parsable --export=ALL "$here/extract.sbatch")
teacher=$(sbatch --parsable --export=ALL --dependency="afterok:${extract%%;*}" "$here/cache-teacher.sbatch")
sbatch --parsable --export=ALL --dependency="afterok:${teacher%%;*}" --job-name=pcd-merge --time=00:10:00 \
  --wrap "$PCD manifest merge '$WORK/extracted' && $PCD manifest merge '$WORK/shards'"
echo "submitted: extraction $extract, teacher $teacher (after it), merge (after both)"
