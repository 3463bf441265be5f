"""SemiSAMTrain's Qt-free logic: the training child process and its progress (``runner``),
GUI values ⇄ config and the dataset check (``settings``), and the live chart's MRML nodes
(``chart``)."""
