"""SemiSAMSegment's library: Qt-free logic (MRML, numpy, ``semisam``) and the Segment Editor effect."""
