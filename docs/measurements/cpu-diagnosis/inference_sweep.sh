#!/bin/bash
# Inference-knob sweep of the shipped checkpoint on the VALIDATION sets (seed 200000), made with
#   python -m locis_rl.data.generate --env locis/MultiObject-v0 --env-kwargs level=a --episodes 12 \
#       --frames 24 --seed 200000 --out /root/data/val_a_seed200000.h5      # likewise c and e
# Results: inference_sweep.json (summarised in docs/results.md).
export OMP_NUM_THREADS=1
run() { name=$1; shift; for lvl in a c e; do
  out=/root/exp/sweep/${name}_$lvl.json; [ -f $out ] && continue
  python -m locis_rl.evaluate --checkpoint default --data /root/data/val_${lvl}_seed200000.h5 --mode reg seg --max-sequences 12 --json $out "$@" > /root/exp/sweep/${name}_$lvl.log 2>&1
done; }
run base
run wu3 --override assignment.warmup_inference=3
run wu5 --override assignment.warmup_inference=5
run wu20 --override assignment.warmup_inference=20
run nof0005 --override assignment.new_object_fraction=0.0005
run nof001 --override assignment.new_object_fraction=0.001
run nof005 --override assignment.new_object_fraction=0.005
run nof01 --override assignment.new_object_fraction=0.01
run pt03 --override assignment.presence_threshold=0.3
run pt07 --override assignment.presence_threshold=0.7
run k8 --num-slots 8
run k10 --num-slots 10
echo done
