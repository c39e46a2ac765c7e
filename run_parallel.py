"""Step-Video-T2V text-to-video, the DiT split over msrun ranks (pipeline x CFG x tensor x Ulysses).

    msrun --worker_num=4 --local_worker_num=4 --join=True --log_dir=logs run_parallel.py \
        --model_dir ckpts/stepvideo-t2v --caption_url 127.0.0.1:5000 --vae_url 127.0.0.1:5001 \
        --ulysses_degree 2 --pp_degree 2 --prompt "..."

Saved latents (written to --save_path before every decode) become mp4 files later, without msrun:

    python run_parallel.py --decode_latents results/<name>.safetensors --vae_url 127.0.0.1

`scripts/run_parallel.sh` wraps msrun (free port, logs, clear errors); without msrun this
runs the whole DiT in one process (--ulysses_degree 1 --pp_degree 1). Flags: stepvideo/config.py;
what each rank does: stepvideo/job.py.
"""
import sys

from stepvideo.job import main

if __name__ == "__main__":
    sys.exit(main())
