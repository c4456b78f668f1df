"""Evaluation metrics of the paper (§4.1) and offline proxies that need no downloaded weights.

- frechet: Fréchet distance, FID (InceptionV3 pool3), FVD16 / FVD32 (I3D), with the networks' architectures
- sync: LSE-C / LSE-D with SyncNet (syncnet_v2) and its MFCC front end
- identity: CSIM (ArcFace IResNet-50) and an offline identity similarity (geometry + colour + texture)
- motion: beat align score, blinks per second, degradation rate DR_n, pose / blink statistics vs ground truth
- lipsync: the offline lip-sync proxy (mouth opening vs speech envelope)

Networks load their released weights from a user path (dawn.metrics.weights); a missing or wrong file is a
DawnError naming the file expected.
"""
