"""Reference face geometry, as plain data: the one home of the ArcFace template and the FFHQ eyes.

Pure data with no imports, so the settings (GAN crop defaults) and the code (alignment, the GAN
crop) read the same numbers.
"""

#: The 112x112 ArcFace reference points (x, y): left eye, right eye, nose tip, left and right mouth corners.
ARCFACE_TEMPLATE_112 = ((38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366), (41.5493, 92.3655), (70.7299, 92.2041))
#: The ArcFace eye centres (the template's first two points).
ARCFACE_EYES = ARCFACE_TEMPLATE_112[:2]
#: FFHQ's aligned eye centres as fractions of the image side ((380, 480) and (650, 480) of 1024 px).
FFHQ_EYES = ((380 / 1024, 480 / 1024), (650 / 1024, 480 / 1024))
